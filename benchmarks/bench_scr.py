"""Benchmark: the SCR-PnP initialiser per stage, per back-end (CPU; CUDA/TensorRT where present).

For the model folder (default ``models/example_T8``): parameters and multiply-accumulates of the
U-Net, network latency with PyTorch and ONNX Runtime (and TensorRT when available), and a whole
initialisation (resize, network, selection, RANSAC PnP) on simulated frames of 256x256 and
512x512. Median and 95th percentile after warm-up; results go to
``benchmarks/results/scr_<device>.json`` and ``.md``.

Usage::

    python benchmarks/bench_scr.py [--models models/example_T8] [--repeats 20] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import numpy as np
import torch

from bench_drr import timed
from reg2d3d_ros.engines import available_backends, make_runner
from reg2d3d_ros.example import load_example
from reg2d3d_ros.geometry import CArmIntrinsics
from reg2d3d_ros.nets import count_macs, count_parameters
from reg2d3d_ros.scr.data import augment_frame, render_views, scr_renderer
from reg2d3d_ros.scr.model import SCRInitializer
from reg2d3d_ros.sim import structure_center, view_pose
from reg2d3d_ros.sim.scenarios import CArmSetup

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=Path, default=REPO / "models" / "example_T8")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args()
    device = args.device
    sync = torch.cuda.synchronize if device == "cuda" else None
    model = SCRInitializer.load(args.models / "scr.pt", device=device)
    size = model.size
    x = torch.zeros(1, 1, size, size, device=device)
    res = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads", "device": device, "models": str(args.models),
        "input_size": size, "output_size": size // model.stride, "parameters": count_parameters(model.net),
        "gmacs": count_macs(model.net, x) / 1e9, "network_ms": {}, "initialise_ms": {},
    }
    with torch.no_grad():
        med, p95, _ = timed(lambda: model.net(x), args.repeats, warmup=3, sync=sync)
    res["network_ms"]["pytorch"] = {"median": med, "p95": p95}
    for backend in [b for b in available_backends() if b != "pytorch"]:
        if backend == "tensorrt" and device != "cuda":
            continue
        run = make_runner(args.models / "scr.onnx", backend, device)
        xn = x.cpu().numpy()
        med, p95, _ = timed(lambda: run(xn), args.repeats, warmup=3)
        res["network_ms"][backend] = {"median": med, "p95": p95}
    # whole initialisations on simulated frames
    ct = load_example()
    c = structure_center(ct, model.meta.get("target", "T8"))
    renderer = scr_renderer(ct, step_mm=2.0)
    for frame_size in (256, 512):
        setup = CArmSetup().at_size(frame_size)
        K = setup.intrinsics().K(torch.float64)
        T = view_pose(c, setup, "oblique")
        L = render_views(renderer, K, frame_size, T[None])["line_integral"][0]
        frame = augment_frame(L, np.random.default_rng(0))
        for backend in res["network_ms"]:
            model.runner = None if backend == "pytorch" else make_runner(args.models / "scr.onnx", backend, device)
            stages = []

            def once():
                r = model.initialise(frame, K.numpy())
                stages.append((r.network_seconds * 1e3, r.pnp_seconds * 1e3))

            med, p95, _ = timed(once, args.repeats, warmup=2)
            st = np.array(stages[2:])
            res["initialise_ms"][f"{frame_size}/{backend}"] = {"median": med, "p95": p95, "network_median": float(np.median(st[:, 0])),
                                                               "pnp_median": float(np.median(st[:, 1]))}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"scr_{device}.json").write_text(json.dumps(res, indent=1))
    lines = [f"# SCR-PnP initialiser ({device})", "", f"Machine: {res['machine']}. Model: `{args.models}` (input {size}x{size}, output "
             f"{res['output_size']}x{res['output_size']}): {res['parameters']:,} parameters, {res['gmacs']:.3f} GMAC "
             f"({2 * res['gmacs']:.3f} GFLOP) per frame.", "", "| network back-end | median (ms) | p95 (ms) |", "|---|---|---|"]
    lines += [f"| {b} | {v['median']:.1f} | {v['p95']:.1f} |" for b, v in res["network_ms"].items()]
    lines += ["", "| frame / back-end | initialisation median (ms) | p95 (ms) | network (ms) | PnP (ms) |", "|---|---|---|---|---|"]
    lines += [f"| {k} | {v['median']:.1f} | {v['p95']:.1f} | {v['network_median']:.1f} | {v['pnp_median']:.1f} |" for k, v in res["initialise_ms"].items()]
    (args.out / f"scr_{device}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
