"""Benchmark: one PPC tracking update, per stage, on CPU (and CUDA when available).

Stages of :meth:`reg2d3d_ros.ppc.PPCRegistrator.update` at the full resolution of a frame
(the tracking configuration): fixed-frame gradient, target DRR render, moving gradient, contour
selection, NGC correspondence search, PPC solve (MCCR), and the whole update; plus a whole
``track()`` call (what the node runs per frame). Frames of 256x256 and 512x512 of vertebra T8
(simulated). Median and 95th percentile after warm-up; results go to
``benchmarks/results/ppc_<device>.json`` and ``.md``.

Usage::

    python benchmarks/bench_ppc.py [--repeats 20] [--vertebra T8] [--view ap]
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import numpy as np
import torch

from bench_drr import timed
from reg2d3d_ros.example import load_example
from reg2d3d_ros.images import to_attenuation
from reg2d3d_ros.ppc import TRACKING_CONFIG, PPCRegistrator, gradient_image, ngc_search, select_contours, solve_ppc
from reg2d3d_ros.sim import CArmSetup, XrayDegradation, simulate_sequence, structure_center, view_pose, xray_renderer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--vertebra", default="T8")
    ap.add_argument("--view", default="ap")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args()
    ct = load_example()
    reg = PPCRegistrator.from_ct(ct, args.vertebra)
    cfg = TRACKING_CONFIG
    center = structure_center(ct, args.vertebra)
    rows = []
    for size in (256, 512):
        setup = CArmSetup().at_size(size)
        intr = setup.intrinsics()
        K = intr.K(torch.float64)
        T = view_pose(center, setup, args.view)
        seq = simulate_sequence(xray_renderer(ct), intr, T[None], XrayDegradation(), seed=0)
        img = to_attenuation(seq.images[0].astype(np.float32), seq.intensity)
        img_t = torch.from_numpy(img)
        gf = gradient_image(img_t, cfg.smooth_sigma_px).double()
        gm = reg.moving_gradient(T, intr).double()
        c = select_contours(reg.pts, reg.normals, T, K, size, size, max_cos=cfg.max_cos, margin_px=cfg.patch_half + 1, max_points=cfg.max_points)
        uv_c, score, _, _ = ngc_search(gf, gm, c.uv, c.normal_2d, cfg.search_px[0], cfg.patch_half, cfg.patch_half_along)
        w = score.clamp(min=0)
        stages = {
            "fixed gradient": lambda: gradient_image(img_t, cfg.smooth_sigma_px),
            "target DRR render": lambda: reg.renderer.render(T[None], K, size, size),
            "DRR + moving gradient": lambda: reg.moving_gradient(T, intr),
            "contour selection": lambda: select_contours(reg.pts, reg.normals, T, K, size, size, max_cos=cfg.max_cos, margin_px=cfg.patch_half + 1),
            f"NGC search ({len(c)} points)": lambda: ngc_search(gf, gm, c.uv, c.normal_2d, cfg.search_px[0], cfg.patch_half, cfg.patch_half_along),
            "PPC solve (MCCR)": lambda: solve_ppc(c.w_opt[None], c.g_opt[None], uv_c[None], K, w[None], robust="mccr"),
            "whole update": lambda: reg.update(T, gf.float(), intr, cfg.search_px[0], config=cfg, T_anchor=T),
            "track() per frame": lambda: reg.track(img, intr, T),
        }
        for name, fn in stages.items():
            med, p95, _ = timed(fn, args.repeats, warmup=2)
            rows.append({"size": size, "stage": name, "median_ms": round(med, 2), "p95_ms": round(p95, 2)})
            print(f"{size}x{size}  {name:32s} median {med:7.2f} ms  p95 {p95:7.2f} ms", flush=True)
    info = {
        "device": "cpu",
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "vertebra": args.vertebra,
        "view": args.view,
        "config": "TRACKING_CONFIG (one full-resolution update)",
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ppc_cpu.json").write_text(json.dumps(info, indent=2))
    lines = [
        f"# PPC tracking update per stage (CPU, {info['threads']} threads, torch {info['torch']})",
        "",
        f"Vertebra {args.vertebra}, {args.view} view, simulated frame; median and 95th percentile of {args.repeats} runs after warm-up.",
        "",
        "| size | stage | median [ms] | p95 [ms] |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r['size']} | {r['stage']} | {r['median_ms']} | {r['p95_ms']} |" for r in rows]
    (args.out / "ppc_cpu.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / 'ppc_cpu.json'}")


if __name__ == "__main__":
    main()
