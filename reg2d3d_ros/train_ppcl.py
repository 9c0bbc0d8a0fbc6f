"""Train the PPC-L correspondence weighting (one PointNet per resolution level) on simulated cases.

    python -m reg2d3d_ros.train_ppcl --out models/ppcl [--quality tiny|quick|full]

Training cases are simulated frames of the example CT (or ``--ct/--labels/--label-table``) of
the *training* vertebrae (default T3, T4, T5, T7, T9, T11; the evaluation's test vertebrae T6, T8,
T10, T12 are never used), AP and lateral views with jittered angles (10 deg) and isocentre
(15 mm), and start poses with initial mTRE uniform over ``[0, --max-mtre]``. The correspondences
of every start are searched once per level and cached under ``--cache`` (resumable: finished
cases are reused). Validation: the cases of the last training vertebra. Each level's training
writes a checkpoint per epoch and resumes from it. Output: ``OUT/ppcl.pt`` and ``OUT/ppcl.json``
(metadata and per-epoch history).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .errors import ConfigError, run_cli
from .volume import add_label_arguments

QUALITY = {
    # frames per (vertebra, view), starts per frame, epochs
    "tiny": (1, 6, 3),
    "quick": (3, 30, 60),
    "full": (6, 50, 100),
}


def training_parser(prog: str, description: str, out: str, cache: str, what: str, quality: dict, per_frame: tuple, size: int,
                    seed: int) -> argparse.ArgumentParser:
    """The arguments every training command shares (output, cache, quality, vertebrae, CT, size, seed).

    ``per_frame`` is ``(option, help)`` of the per-frame count (e.g. ``("--starts", "start poses per frame")``).
    """
    ap = argparse.ArgumentParser(prog=prog, description=description)
    ap.add_argument("--out", type=Path, default=Path(out), help=f"output folder for {what}")
    ap.add_argument("--cache", type=Path, default=Path(cache), help="folder for the precomputed training data and checkpoints")
    ap.add_argument("--quality", choices=sorted(quality), default="quick")
    ap.add_argument("--vertebrae", default="T3,T4,T5,T7,T9,T11", help="training vertebrae (the last one validates)")
    ap.add_argument("--frames-per-view", type=int, default=None)
    ap.add_argument(per_frame[0], type=int, default=None, help=per_frame[1])
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--size", type=int, default=size, help="frame size, pixels (detector 307 mm)")
    ap.add_argument("--ct", type=Path, help="CT (NIfTI); default: the example CT")
    ap.add_argument("--labels", type=Path, help="label map of --ct")
    ap.add_argument("--label-table", type=Path, help="label names of --labels, CSV with columns structure,id (default: TotalSegmentator's, built in)")
    add_label_arguments(ap)
    ap.add_argument("--seed", type=int, default=seed)
    return ap


def build_parser() -> argparse.ArgumentParser:
    ap = training_parser("python -m reg2d3d_ros.train_ppcl", __doc__.split("\n\n")[0], "models/ppcl", "build/ppcl_cache", "ppcl.pt / ppcl.json",
                         QUALITY, ("--starts", "start poses per frame"), 512, 2000)
    ap.add_argument("--max-mtre", type=float, default=30.0, help="largest initial mTRE of the starts, mm")
    ap.add_argument("--levels", default="0.25,0.5,1.0", help="resolution levels to train (PPC-L+ needs 0.25 and 0.5 only)")
    return ap


def _sample_to_blob(s) -> dict:
    return {k: getattr(s, k) for k in ("features", "w_opt", "g_opt", "uv_corr", "K", "T_start", "T_gt", "K_full", "target_pts")} | {
        "noise_mm": float(s.noise_mm), "group": s.group}


def _blob_to_sample(b: dict):
    from .ppc.learned import Sample

    return Sample(**b)


def cached_training_frames(ct, vertebrae, frames_per_view: int, n_starts: int, max_mtre: float, size: int, seed: int, cache: Path,
                           prefix: str, per_frame, what: str, progress: bool = True, make_registrator=None):
    """Yield ``(vertebra, blob)`` for every training frame; ``blob = per_frame(registrator, cases)`` is computed once.

    A frame is one simulated case set of a vertebra (AP and lateral, jittered) with ``n_starts``
    starts; blobs (tensors, lists, dicts) are cached as ``cache/<prefix><vertebra>_f<k>_...pt``.
    The registrator is ``make_registrator(ct, vertebra)`` (default
    :meth:`reg2d3d_ros.ppc.PPCRegistrator.from_ct`).
    """
    import torch

    from .eval.cases import CaseSet, make_cases
    from .ppc import PPCRegistrator
    from .progress import bar as _bar, end_line
    from .sim import CArmSetup

    cache.mkdir(parents=True, exist_ok=True)
    setup = CArmSetup().at_size(size)
    jobs = [(v, f) for v in vertebrae for f in range(frames_per_view)]
    t0 = time.time()
    for j, (vert, f) in enumerate(jobs):
        path = cache / f"{prefix}{vert}_f{f}_s{seed}_n{n_starts}_m{max_mtre:g}_px{size}.pt"
        if path.exists():
            blob = torch.load(path, map_location="cpu", weights_only=True)
        else:
            cs = CaseSet(f"train-{vert}-{f}", (vert,), seed=seed + 100 * f + 10 * vertebrae.index(vert), jitter_deg=10.0, jitter_mm=15.0)
            cases = make_cases(ct, cs, n_starts, max_mtre_mm=max_mtre, setup=setup)
            blob = per_frame((make_registrator or PPCRegistrator.from_ct)(ct, vert), cases)
            tmp = path.with_suffix(".tmp")
            torch.save(blob, tmp)
            tmp.replace(path)
        yield vert, blob
        if progress:
            _bar(what, j + 1, len(jobs), time.time() - t0)
    if progress:
        end_line()


def collect(ct, vertebrae, frames_per_view: int, n_starts: int, max_mtre: float, size: int, seed: int, cache: Path, progress: bool = True) -> dict:
    """``{vertebra: {level: [Sample]}}``, computing and caching what is missing."""
    from .ppc import PPCL_CONFIG
    from .ppc.learned import samples_for_case

    def per_frame(reg, cases):
        blob = {}
        for case in cases:
            for level, rows in samples_for_case(reg, case, PPCL_CONFIG).items():
                blob.setdefault(repr(float(level)), []).extend(_sample_to_blob(s) for s in rows)
        return blob

    out = {}
    for vert, blob in cached_training_frames(ct, vertebrae, frames_per_view, n_starts, max_mtre, size, seed, cache, "", per_frame,
                                             "correspondences", progress):
        for level, rows in blob.items():
            out.setdefault(vert, {}).setdefault(float(level), []).extend(_blob_to_sample(b) for b in rows)
    return out


def training_setup(args, epochs_scale: float = 1.0, quality: dict | None = None):
    """``(ct, vertebrae, frames per view, starts, epochs)`` of a training command's arguments.

    ``quality`` maps ``args.quality`` to ``(frames, starts, epochs)`` (default :data:`QUALITY`).

    Raises :class:`ConfigError` for fewer than two vertebrae (the last one validates) or a CT
    without labels; warns when a test vertebra of the evaluation is trained on.
    """
    from .example import load_example
    from .volume import load_ct

    frames, starts, epochs = (quality or QUALITY)[args.quality]
    frames = args.frames_per_view or frames
    starts = args.starts or starts
    epochs = args.epochs or max(1, int(epochs * epochs_scale))
    vertebrae = [v.strip() for v in args.vertebrae.split(",") if v.strip()]
    if len(vertebrae) < 2:
        raise ConfigError("--vertebrae needs at least two vertebrae (the last one validates)")
    for bad in ("T6", "T8", "T10", "T12"):
        if bad in vertebrae and args.ct is None:
            print(f"warning: {bad} is a test vertebra of the evaluation; its results will not be held out", file=sys.stderr)
    if args.ct is not None:
        if args.labels is None:
            raise ConfigError("--ct needs --labels")
        ct = load_ct(args.ct, labels_path=args.labels, label_table=args.label_table, label_set=args.label_set,
                     resample_labels=args.resample_labels)
    else:
        ct = load_example()
    return ct, vertebrae, frames, starts, epochs


def _run(args) -> int:
    from .ppc import PPCL_CONFIG
    from .ppc.learned import LearnedWeighting, PPCLTrainConfig, train_level

    from .progress import Steps

    ct, vertebrae, frames, starts, epochs = training_setup(args)
    t0 = time.time()
    step = Steps(stream=sys.stderr)
    step(f"collecting correspondences of {', '.join(vertebrae)} (cached in {args.cache})")
    data = collect(ct, vertebrae, frames, starts, args.max_mtre, args.size, args.seed, args.cache)
    t_data = time.time() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    tcfg = PPCLTrainConfig(epochs=epochs)
    nets, histories = {}, {}
    try:
        levels = [float(x) for x in args.levels.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--levels must be comma-separated numbers, got {args.levels!r}") from None
    if not levels or any(all(abs(lv - x) > 1e-6 for x in PPCL_CONFIG.levels) for lv in levels):
        raise ConfigError(f"--levels must be among {', '.join(str(x) for x in PPCL_CONFIG.levels)}")
    for level in levels:
        train = [s for v in vertebrae[:-1] for s in data[v].get(level, [])]
        val = [s for s in data[vertebrae[-1]].get(level, [])]
        step(f"training PPC-L level {level}: {len(train)} training, {len(val)} validation samples, {epochs} epochs")
        net, hist = train_level(train, val, PPCL_CONFIG, tcfg, checkpoint=args.cache / f"ppcl_level{level:g}.ckpt")
        nets[level], histories[repr(level)] = net, hist
    meta = {
        "local": list(tcfg.local), "head": list(tcfg.head), "features": 13, "levels": levels,
        "vertebrae": vertebrae, "frames_per_view": frames, "starts": starts, "max_mtre_mm": args.max_mtre, "size": args.size,
        "epochs": epochs, "loss": tcfg.loss, "seed": args.seed, "seconds_data": round(t_data), "seconds_total": round(time.time() - t0),
    }
    LearnedWeighting(nets, meta).save(args.out / "ppcl.pt")
    (args.out / "ppcl.json").write_text(json.dumps({"meta": meta, "history": histories}, indent=1))
    best = {k: min(h, key=lambda r: r["val_log_ratio"] if tcfg.loss == "relative" else r["val_pe_px"]) for k, h in histories.items()}
    for k, b in best.items():
        print(f"level {k}: validation PE {b['val_pe_before_px']:.1f} px -> {b['val_pe_px']:.1f} px (median {b['val_pe_median_px']:.1f}) after one update")
    print(f"wrote {args.out / 'ppcl.pt'} ({round(time.time() - t0)} s)")
    return 0


def main(argv=None) -> int:
    """Entry point."""
    args = build_parser().parse_args(argv)
    return run_cli(lambda: _run(args), "python -m reg2d3d_ros.train_ppcl")


if __name__ == "__main__":
    sys.exit(main())
