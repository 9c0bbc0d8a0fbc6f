"""Benchmark: DRR render time per frame (CPU, and CUDA when available).

Renders the example CT at 256x256 and 512x512 for the whole volume, the whole volume binned
2x2 in-plane (what the simulator uses) and the volume cropped around one vertebra (what
registration renders), with and without bone-surface crossings (scene coordinates). Reports
median and 95th percentile over repeated renders after a warm-up, and writes
``benchmarks/results/drr_<device>.json`` and ``.md``.

Usage::

    python benchmarks/bench_drr.py [--device cpu|cuda] [--repeats 7] [--vertebra T8]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from reg2d3d_ros.drr import DRRRenderer
from reg2d3d_ros.example import load_example
from reg2d3d_ros.sim import CArmSetup, structure_center, view_pose
from reg2d3d_ros.volume import resolve_label


def timed(fn, repeats: int, warmup: int = 1, sync=None):
    """Median and 95th percentile of ``fn()`` in ms after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
        if sync:
            sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append((time.perf_counter() - t) * 1e3)
    return float(np.median(times)), float(np.percentile(times, 95)), times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--vertebra", default="T8")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else None

    ct = load_example()
    label = resolve_label(args.vertebra, ct.label_names)
    center = structure_center(ct, args.vertebra)
    roi = ct.crop_to_labels([label], margin_mm=15.0)
    volumes = {
        "whole CT (512x512x133)": (ct, None),
        "whole CT binned 2x2 (256x256x133)": (ct.binned((2, 2, 1)), None),
        f"{args.vertebra} crop {roi.hu.shape[::-1]}": (roi, roi.label_mask([label])),
    }
    rows = []
    for size in (256, 512):
        setup = CArmSetup().at_size(size)
        K = setup.intrinsics().K()
        T = view_pose(center, setup, "oblique").to(device)
        for name, (vol, mask) in volumes.items():
            rend = DRRRenderer.from_volume(vol, bone_mask=mask, device=device)
            variants = [("line integral", False)] + ([("+ surfaces", True)] if mask is not None else [])
            for label_v, surf in variants:
                reps = max(3, args.repeats // (3 if "whole CT (" in name and size == 512 else 1))
                med, p95, _ = timed(lambda: rend.render(T[None], K.to(device), size, size, surfaces=surf), reps, sync=sync)
                rows.append({"size": size, "volume": name, "output": label_v, "median_ms": round(med, 1), "p95_ms": round(p95, 1), "repeats": reps})
                print(f"{size}x{size}  {name:38s} {label_v:14s} median {med:8.1f} ms  p95 {p95:8.1f} ms", flush=True)
    info = {
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "view": "oblique (LAO 35, CRAN 10), SDD 1020 mm, SID 680 mm, detector 307 mm",
        "step_mm": "smallest voxel spacing of each volume",
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    tag = "cpu" if device.type == "cpu" else "cuda"
    (args.out / f"drr_{tag}.json").write_text(json.dumps(info, indent=2))
    lines = [
        f"# DRR render time ({info['device']}, {info['threads']} threads, torch {info['torch']})",
        "",
        f"View: {info['view']}. Median and 95th percentile per frame after one warm-up render.",
        "",
        "| size | volume | output | median [ms] | p95 [ms] |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {r['size']} | {r['volume']} | {r['output']} | {r['median_ms']} | {r['p95_ms']} |" for r in rows]
    (args.out / f"drr_{tag}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / f'drr_{tag}.json'}")


if __name__ == "__main__":
    main()
