"""Train the correlation-driven learned similarity on simulated frames of the example CT.

    python -m reg2d3d_ros.train_similarity --out models/similarity [--quality tiny|quick|full]
    torchrun --nproc_per_node=N -m reg2d3d_ros.train_similarity ...   # DistributedDataParallel

Training frames are simulated X-rays of the *training* vertebrae (default T3, T4, T5, T7, T9 and
T11, the last one validating; the evaluation's test vertebrae T6, T8, T10, T12 are never used):
AP and lateral views with jittered angles (10 deg) and isocentre (15 mm). Per frame, moving DRRs
of the target at perturbations drawn like the seed's starts (half of them scaled down towards
the truth) with their pose Jacobians (:func:`reg2d3d_ros.intensity.learned.similarity_samples`)
are computed once and cached under ``--cache`` (resumable). Training writes a checkpoint per
epoch and resumes from it. Output: ``OUT/similarity.pt`` and ``OUT/similarity.json`` (metadata,
per-epoch history, and the same validation angles for NCC and gradient correlation).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .errors import ConfigError, run_cli

QUALITY = {
    # frames per (vertebra, view), samples per frame and view, epochs
    "tiny": (1, 4, 2),
    "quick": (6, 40, 20),
    "full": (8, 48, 30),
}


def build_parser() -> argparse.ArgumentParser:
    from .train_ppcl import training_parser

    ap = training_parser("python -m reg2d3d_ros.train_similarity", __doc__.split("\n\n")[0], "models/similarity", "build/similarity_cache",
                         "similarity.pt / similarity.json", QUALITY, ("--samples", "moving images per frame and view"), 256, 4000)
    ap.add_argument("--input-size", type=int, default=128, help="network input, pixels (size / 2 avoids resizing)")
    ap.add_argument("--device", default="cpu", help="training device (cpu, cuda, cuda:N; under torchrun each rank takes its local GPU)")
    return ap


def collect(ct, vertebrae, frames_per_view: int, n_samples: int, size: int, seed: int, cache: Path, progress: bool = True) -> dict:
    """``{vertebra: [sample dict, ...]}`` (one dict per case), computing and caching what is missing."""
    from .intensity import IntensityRegistrator
    from .intensity.learned import similarity_samples
    from .train_ppcl import cached_training_frames

    def per_frame(reg, cases):
        return [similarity_samples(reg, c.image_att, c.intrinsics, c.T_gt, n_samples, seed=c.seed + 7) for c in cases]

    out = {}
    for vert, rows in cached_training_frames(ct, vertebrae, frames_per_view, n_samples, 30.0, size, seed, cache, "sim_", per_frame,
                                             "similarity samples", progress, make_registrator=IntensityRegistrator.from_ct):
        out.setdefault(vert, []).extend(rows)
    return out


def _run(args) -> int:
    import os

    import torch

    from .intensity.learned import SimilarityTrainConfig, baseline_angles, train_similarity
    from .intensity.metrics import gradient_correlation, ncc
    from .train_ppcl import training_setup

    args.starts = args.samples
    ct, vertebrae, frames, samples, epochs = training_setup(args, quality=QUALITY)
    if args.input_size % 8 or args.input_size < 16:
        raise ConfigError(f"--input-size must be a multiple of 8 and at least 16, got {args.input_size}")
    device = args.device
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {args.device}: CUDA is not available here")
    from .progress import Steps

    t0 = time.time()
    step = Steps(3, stream=sys.stderr, enabled=int(os.environ.get("RANK", "0")) == 0)
    step(f"collecting training samples of {', '.join(vertebrae)} (cached in {args.cache})")
    data = collect(ct, vertebrae, frames, samples, args.size, args.seed, args.cache)
    t_data = time.time() - t0
    train = [s for v in vertebrae[:-1] for s in data[v]]
    val = data[vertebrae[-1]]
    n_tr, n_va = sum(len(s["xi"]) for s in train), sum(len(s["xi"]) for s in val)
    step.note(f"{n_tr} training, {n_va} validation samples ({t_data:.0f} s)")
    cfg = SimilarityTrainConfig(epochs=epochs, input_size=args.input_size, seed=args.seed)
    step(f"training the learned similarity ({epochs} epochs, device {device})")
    model, hist = train_similarity(train, val, cfg, checkpoint=args.cache / f"similarity_s{args.seed}_{'-'.join(vertebrae)}_f{frames}_n{samples}.ckpt", device=device)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    from .intensity.learned import IN_PLANE

    baselines = {}
    step("validation angles of gradient correlation and NCC (the baselines)")
    for name, fn in (("gc", gradient_correlation), ("ncc", ncc)):
        a = baseline_angles(val, fn, cfg.rot_radius_mm)
        ai = baseline_angles(val, fn, cfg.rot_radius_mm, dims=IN_PLANE)
        baselines[name] = {"val_angle_mean_deg": float(a.mean()), "val_angle_median_deg": float(sorted(a)[len(a) // 2]),
                           "val_descent_fraction": float((a < 90).mean()), "val_inplane_angle_mean_deg": float(ai.mean())}
    meta = {"vertebrae": vertebrae, "frames_per_view": frames, "samples": samples, "size": args.size, "epochs": epochs, "seed": args.seed,
            "seconds_data": round(t_data), "seconds_total": round(time.time() - t0), "baselines_unmasked": baselines}
    model.meta.update(meta)
    args.out.mkdir(parents=True, exist_ok=True)
    model.save(args.out / "similarity.pt")
    (args.out / "similarity.json").write_text(json.dumps({"meta": model.meta, "history": hist}, indent=1))
    best = hist[model.meta["best_epoch"]] if hist else {}
    if best:
        print(f"learned: validation gradient angle mean {best['val_angle_mean_deg']:.1f} deg, median {best['val_angle_median_deg']:.1f}, "
              f"descent {100 * best['val_descent_fraction']:.0f} %, in-plane {best['val_inplane_angle_mean_deg']:.1f} deg (epoch {best['epoch'] + 1})")
    for name, b in baselines.items():
        print(f"{name}: validation gradient angle mean {b['val_angle_mean_deg']:.1f} deg, median {b['val_angle_median_deg']:.1f}, "
              f"descent {100 * b['val_descent_fraction']:.0f} %, in-plane {b['val_inplane_angle_mean_deg']:.1f} deg")
    print(f"wrote {args.out / 'similarity.pt'} ({round(time.time() - t0)} s)")
    return 0


def main(argv=None) -> int:
    """Entry point."""
    args = build_parser().parse_args(argv)
    return run_cli(lambda: _run(args), "python -m reg2d3d_ros.train_similarity")


if __name__ == "__main__":
    sys.exit(main())
