"""``python -m reg2d3d_ros.prepare``: prepare a new patient's CT for the node.

Steps (each resumable: finished steps are kept, an interrupted one continues):

1. load the CT and its label map; extract the target's bone surface points (PPC) and store them
   (``surface_<target>.npz``);
2. render training views of the CT around the target (:mod:`reg2d3d_ros.scr.data`), cached in
   ``OUT/cache``;
3. train the SCR U-Net (checkpoint after every epoch in ``OUT/cache``);
4. write the model folder: ``scr.pt`` (state dict + metadata, safe to load), ``scr.onnx`` (for
   ONNX Runtime / TensorRT) and ``scr.json`` (how it was made, training history);
5. optionally (``--baseline``) train the pose-regression baseline (``posenet.pt``) for the evaluation.

Everything it writes records what it was made from (:mod:`reg2d3d_ros.provenance`: SHA-256 of
the CT and of the label map, the target's name and id, the C-arm geometry), and the node refuses
a folder made for another CT or target (and ``prepare`` refuses to continue in one). ``scr.json``'s
``training.seconds`` is the time of every run that went into the folder (an interrupted run
resumed later counts both); ``training.runs`` lists them (``OUT/cache/runs.json`` keeps them
between runs).

``--quality quick`` is a CPU model (fewer views and epochs: minutes to an hour on a laptop);
``--quality full`` is meant for a GPU (more views, more epochs). The node uses the folder as its
``models_dir``.

The label map must share the CT's grid (``--resample-labels`` resamples one that does not);
its ids are named by ``--label-table`` or else by TotalSegmentator's names, built in
(``--label-set``: v2, v1, or ``auto``: the version the label map shows, else v2). After an error,
the folders this run created and left empty are removed.

Usage::

    python -m reg2d3d_ros.prepare --ct CT.nii.gz --labels LABELS.nii.gz [--label-table T.csv | --label-set auto]
        [--resample-labels] --target T8 --out models/patient [--quality quick|full] [--device auto]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from .errors import ConfigError, run_cli
from .scr.data import PHYSICS
from .volume import add_ct_arguments

#: Presets of the time/quality knob: training views, epochs, batch size.
QUALITY = {
    "tiny": {"views": 24, "epochs": 2, "batch_size": 8, "widths": (8, 16, 24)},  # tests and smoke runs only
    "quick": {"views": 960, "epochs": 40, "batch_size": 16, "widths": (24, 48, 64, 96)},
    "full": {"views": 8000, "epochs": 80, "batch_size": 32, "widths": (32, 64, 96, 128, 160)},
}


def build_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    ap = argparse.ArgumentParser(prog="python -m reg2d3d_ros.prepare", description=__doc__.split("\n\n")[0])
    add_ct_arguments(ap)
    ap.add_argument("--target", default="T8", help="structure the node registers: a vertebra (T8), a TotalSegmentator name "
                    "(vertebrae_T8) or a label id")
    ap.add_argument("--out", type=Path, required=True, help="model folder to write (the node's models_dir)")
    ap.add_argument("--quality", choices=sorted(QUALITY), default="quick", help="time/quality preset")
    ap.add_argument("--views", type=int, default=None, help="training views (overrides the preset)")
    ap.add_argument("--epochs", type=int, default=None, help="training epochs (overrides the preset)")
    ap.add_argument("--size", type=int, default=128, help="network input size, pixels")
    ap.add_argument("--sdd-mm", type=float, default=1020.0, help="C-arm source-to-detector distance, mm")
    ap.add_argument("--detector-mm", type=float, default=307.2, help="detector width, mm")
    ap.add_argument("--step-mm", type=float, default=2.5, help="ray-marching step of the training renderer, mm")
    ap.add_argument("--physics", choices=PHYSICS, default="randomised",
                    help="image formation of the training views: randomised (a new domain draw of the simulator per view and epoch) "
                    "or classic (one physics, random dose/scatter/blur/gain)")
    ap.add_argument("--views-preset", choices=("clinical", "wide"), default="clinical",
                    help="view distribution: clinical (AP +-45 deg and lateral, +-20 deg cranial/caudal, target in the field) or "
                    "wide (LAO/RAO +-95 deg, large isocentre offsets)")
    ap.add_argument("--view-targets", default="", help="comma-separated structures the views are centred on, one drawn per view "
                    "(default: the target)")
    ap.add_argument("--time-budget-min", type=float, default=0.0,
                    help="stop training after the last epoch that fits this many minutes (0: no limit); the model so far is "
                    "written and the same command resumes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--baseline", action="store_true", help="also train the pose-regression baseline")
    ap.add_argument("--test-views", type=int, default=0, help="also render this many held-out views (OUT/cache/views_test) for the evaluation")
    ap.add_argument("--device", default="auto", help="training device: auto, cpu or cuda")
    ap.add_argument("--init-from", type=Path, default=None, help="warm-start the SCR network from this model file or checkpoint")
    ap.add_argument("--quiet", action="store_true", help="no progress output")
    return ap


def prepare(args) -> Path:
    """Run the steps; returns the model folder.

    After an error (or Ctrl-C), the folders this run created and left empty (``OUT/cache``,
    ``OUT``) are removed; what was written is kept (a later run resumes from it).
    """
    out = Path(args.out)
    created = [d for d in (out, out / "cache") if not d.exists()]
    t0 = time.time()
    finished = False
    try:
        result = _prepare(args, out, t0)
        finished = True
        return result
    except BaseException:
        for d in reversed(created):
            try:
                if d.is_dir() and not any(d.iterdir()):
                    d.rmdir()
            except OSError:
                pass
        raise
    finally:
        _record_run(out / "cache", t0, finished)


def _runs_file(cache: Path) -> Path:
    return cache / "runs.json"


def previous_runs(cache: Path) -> list:
    """The earlier runs of ``prepare`` into a folder (``[{"started", "seconds", "finished"}]``; [] if none or unreadable)."""
    try:
        runs = json.loads(_runs_file(cache).read_text())
    except (OSError, ValueError):
        return []
    return [r for r in runs if isinstance(r, dict) and isinstance(r.get("seconds"), (int, float))] if isinstance(runs, list) else []


def _record_run(cache: Path, t0: float, finished: bool) -> None:
    """Append this run (start, duration, finished or not) to ``cache/runs.json`` when the cache folder exists."""
    if not cache.is_dir():
        return
    runs = previous_runs(cache) + [{"started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t0)),
                                    "seconds": round(time.time() - t0, 1), "finished": bool(finished)}]
    try:
        tmp = _runs_file(cache).with_suffix(".tmp")
        tmp.write_text(json.dumps(runs, indent=1))
        tmp.replace(_runs_file(cache))
    except OSError:
        pass  # the record of the time spent is not worth failing the run for


def _check_resumable(out: Path, provenance: dict) -> None:
    """Refuse to continue in a folder that holds a model (or surface points) made from other data.

    Raises
    ------
    ConfigError
        ``out`` was written for another CT, label map, target or C-arm geometry.
    """
    from .provenance import provenance_differences, read_models_provenance

    made, where = read_models_provenance(out) if out.is_dir() else (None, None)
    if made is None:
        for f in sorted(out.glob("surface_*.npz")) if out.is_dir() else []:
            try:
                with np.load(f, allow_pickle=False) as z:
                    if "provenance_json" in z.files:
                        made, where = json.loads(str(z["provenance_json"])), f
                        break
            except (OSError, ValueError):
                continue
    diffs = provenance_differences(made, provenance) if isinstance(made, dict) else []
    if diffs:
        raise ConfigError(f"{out} holds a model folder made for {'; '.join(diffs)} (recorded in {where}): choose another --out, "
                          "or delete that folder to start afresh")


def _prepare(args, out: Path, t0: float) -> Path:
    from .engines import export_network, file_sha256, networks_of, resolve_device
    from .ppc import PPCRegistrator
    from .ppc.surface import surface_sampling
    from .provenance import make_provenance
    from .progress import Steps
    from .scr.data import CLINICAL_VIEWS, DatasetSpec, SceneNormalisation, ViewDistribution, build_view_cache, open_views
    from .scr.model import SCRInitializer
    from .scr.train import TrainConfig, train_pose_regression, train_scr
    from .sim import structure_center
    from .volume import load_ct

    progress = not args.quiet
    device = resolve_device(args.device)
    preset = QUALITY[args.quality]
    n_views = args.views or preset["views"]
    epochs = args.epochs or preset["epochs"]
    if args.size % 32:
        raise ConfigError(f"--size must be a multiple of 32, got {args.size}")
    cache = out / "cache"

    # the project's step lines (reg2d3d_ros.progress), timed from the start of this run
    say = Steps(stream=sys.stderr, enabled=progress, t0=time.monotonic() - (time.time() - t0))

    say(f"loading CT {args.ct}")
    ct = load_ct(args.ct, labels_path=args.labels, label_table=args.label_table, label_set=args.label_set,
                 resample_labels=args.resample_labels)
    lid = ct.structure_id(args.target)
    provenance = make_provenance(ct, args.target, args.sdd_mm, args.detector_mm, args.size)
    _check_resumable(out, provenance)
    cache.mkdir(parents=True, exist_ok=True)
    surf_path = out / f"surface_{args.target}.npz"
    if not surf_path.exists():
        say(f"extracting the bone surface of {args.target} (PPC)")
        reg = PPCRegistrator.from_ct(ct, args.target, surface_kwargs=surface_sampling(ct.spacing_mm))  # a coarse CT: a finer grid
        np.savez(surf_path, pts_ct_mm=reg.pts.numpy(), normals_ct=reg.normals.numpy(), label=lid,
                 target_pts_ct_mm=ct.label_points_ct_mm([lid], max_points=2000, seed=0), provenance_json=json.dumps(provenance))
    center = tuple(float(v) for v in structure_center(ct, args.target))
    view_targets = [t for t in (args.view_targets or "").split(",") if t]
    centers = tuple(tuple(float(v) for v in structure_center(ct, t)) for t in view_targets)
    spec = DatasetSpec(target=str(args.target), center_ct_mm=center, size=args.size, n_views=n_views, seed=args.seed,
                       sdd_mm=args.sdd_mm, pixel_spacing_mm=args.detector_mm / args.size, step_mm=args.step_mm,
                       views=CLINICAL_VIEWS if args.views_preset == "clinical" else ViewDistribution(), physics=args.physics,
                       view_centers_ct_mm=centers)
    say(f"rendering {n_views} training views at {args.size}x{args.size} into {cache / 'views_train'}")
    files = build_view_cache(ct, spec, cache / "views_train", progress=progress)
    if args.test_views > 0:
        test_spec = replace(spec, n_views=args.test_views, seed=args.seed + 777, step_mm=None)
        say(f"rendering {args.test_views} held-out views into {cache / 'views_test'}")
        build_view_cache(ct, test_spec, cache / "views_test", progress=progress)
    views = open_views(cache / "views_train", files)
    norm = SceneNormalisation(center, 100.0)
    cfg = TrainConfig(epochs=epochs, batch_size=preset["batch_size"], seed=args.seed, widths=tuple(preset["widths"]),
                      time_budget_s=60.0 * args.time_budget_min)
    say(f"training the SCR U-Net ({epochs} epochs, device {device})")
    net, history = train_scr(views, norm, cfg, cache / "scr_checkpoint.pt", device=device, progress=progress, init_from=args.init_from,
                             intrinsics=spec.intrinsics())
    finished = len(history) >= epochs
    runs = previous_runs(cache)
    seconds = round(time.time() - t0)
    meta = {
        "size": args.size, "stride": cfg.stride, "widths": list(cfg.widths), "center_ct_mm": list(center), "scale_mm": norm.scale_mm,
        "target": str(args.target), "label_names": getattr(ct.label_names, "source", ""), "ct": str(args.ct), "sdd_mm": args.sdd_mm,
        "detector_mm": args.detector_mm,
        "quality": args.quality, "training": {"views": json.loads(json.dumps(asdict(spec))), "config": json.loads(json.dumps(asdict(cfg))),
                                               "history": history, "device": device,
                                               "seconds": round(sum(r["seconds"] for r in runs) + seconds),
                                               "runs": runs + [{"started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t0)),
                                                                "seconds": seconds, "finished": finished}]},
        "provenance": provenance,
    }
    model = SCRInitializer(net.cpu(), meta)
    model.save(out / "scr.pt")
    export_network(networks_of(out / "scr.pt")["scr"], out / "scr.onnx", file_sha256(out / "scr.pt"))
    (out / "scr.json").write_text(json.dumps(meta, indent=1))
    say(f"wrote {out / 'scr.pt'}, {out / 'scr.onnx'}")
    if args.baseline:
        say("training the pose-regression baseline")
        pts = np.load(surf_path)["target_pts_ct_mm"]
        pcfg = replace(cfg, epochs=max(1, epochs // 3))
        pnet, phist = train_pose_regression(views, norm, pts, pcfg, cache / "posenet_checkpoint.pt", device=device, progress=progress,
                                            intrinsics=spec.intrinsics())
        sd = {k: v.detach().cpu() for k, v in pnet.state_dict().items()}
        pmeta = {"size": args.size, "widths": list(cfg.widths), "center_ct_mm": list(center), "depth_mm": pnet.depth_mm,
                 "scale_mm": pnet.scale_mm, "history": phist, "provenance": provenance}
        torch.save({"format": "reg2d3d_posenet", "version": 1, "meta_json": json.dumps(pmeta), "state_dict": sd}, cache / "posenet.pt")
        say(f"wrote {cache / 'posenet.pt'}")
    say("done" if finished else f"stopped by the time budget after {len(history)} of {epochs} epochs: the model so far is written; "
        f"run the same command again to resume")
    return out


def main(argv=None) -> int:
    """Entry point."""
    args = build_parser().parse_args(argv)
    # the library's notes (which label names, a resampled label map) go to stderr; --quiet keeps the warnings only
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    lib_log = logging.getLogger("reg2d3d_ros")
    lib_log.addHandler(handler)
    lib_log.setLevel(logging.WARNING if args.quiet else logging.INFO)
    return run_cli(lambda: prepare(args), "python -m reg2d3d_ros.prepare")


if __name__ == "__main__":
    sys.exit(main())
