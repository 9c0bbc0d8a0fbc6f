"""Benchmark: every stage of registration and tracking, per frame size and inference back-end.

Stages, on simulated frames of vertebra T8 at 256x256 and 512x512:

- PPC tracking update (the node's per-frame work, :data:`reg2d3d_ros.ppc.TRACKING_CONFIG`):
  fixed-frame gradient, moving DRR + gradient (the band around the contour points, as the
  update renders it; and the whole frame, for reference), contour selection, NGC correspondence
  search, PPC solve (MCCR), the whole update, and ``track()``;
- networks, for each available back-end (:func:`reg2d3d_ros.engines.load`): the SCR U-Net, the
  PPC-L PointNet and the PPC Flow network + attention at the sizes the node feeds them;
- the learned PPC Flow Attention update (flow network -> correspondences -> attention -> PPC
  solve) at the coarsest level, per back-end;
- the SCR-PnP initialisation (resize, network, pixel selection, RANSAC PnP), per back-end.

Median and 95th percentile after warm-up. Results: ``benchmarks/results/stages_<device>.json``
and ``.md``. Networks run on ``--device`` (``cuda`` where a GPU exists: PyTorch CUDA, ONNX
Runtime's CUDA provider when installed, TensorRT when importable); the PPC geometry (renderer,
contours, NGC, solver) runs on the CPU.

Usage::

    python benchmarks/bench_stages.py [--repeats 20] [--device cpu|cuda] [--sizes 256,512]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from bench_drr import timed
from reg2d3d_ros.engines import available_backends, load
from reg2d3d_ros.example import load_example
from reg2d3d_ros.images import to_attenuation
from reg2d3d_ros.ppc import TRACKING_CONFIG, PPCConfig, PPCRegistrator, gradient_image, ngc_search, select_contours, solve_ppc
from reg2d3d_ros.ppcflow import FlowOperator, attention_features
from reg2d3d_ros.ppcl import LearnedWeighting, correspondence_features
from reg2d3d_ros.ppc.register import _levels
from reg2d3d_ros.scr.model import SCRInitializer
from reg2d3d_ros.sim import CArmSetup, XrayDegradation, simulate_sequence, structure_center, view_pose, xray_renderer

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "models"


from reg2d3d_ros.pipeline import PEAK_RANGE_MM, PipelineConfig, ppc_configs  # noqa: E402
from reg2d3d_ros.ppc.search import peak_check  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--sizes", default="256,512")
    ap.add_argument("--vertebra", default="T8")
    ap.add_argument("--view", default="ap")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args()
    dev = args.device
    sync = torch.cuda.synchronize if dev == "cuda" else None
    backends = [b for b in available_backends() if b != "tensorrt" or dev == "cuda"]
    scr_path, ppcl_path, flow_path = MODELS / "example_T8" / "scr.pt", MODELS / "ppcl" / "ppcl.pt", MODELS / "ppcflow" / "ppc_flow_attention.pt"
    engines = {b: {"scr": load(scr_path, "scr", b, dev), "ppcl": load(ppcl_path, "level_0.25", b, dev),
                   "flow": load(flow_path, "flow", b, dev), "attention": load(flow_path, "attention", b, dev)} for b in backends}
    for b, es in engines.items():
        for e in es.values():
            if e.backend != b:
                raise SystemExit(f"back-end {b} fell back to {e.backend} for {e.name}: {e.notes}")

    ct = load_example()
    reg = PPCRegistrator.from_ct(ct, args.vertebra)
    center = structure_center(ct, args.vertebra)
    scr = SCRInitializer.load(scr_path)
    flow_op = FlowOperator.load(flow_path)
    learned = LearnedWeighting.load(ppcl_path)
    rows = []

    def add(size, group, stage, backend, fn, warmup=2):
        med, p95, _ = timed(fn, args.repeats, warmup=warmup, sync=sync)
        rows.append({"size": size, "group": group, "stage": stage, "backend": backend, "median_ms": round(med, 2), "p95_ms": round(p95, 2)})
        print(f"{size:4d} {group:12s} {stage:44s} {backend:12s} median {med:8.2f} ms  p95 {p95:8.2f} ms", flush=True)

    for size in [int(s) for s in args.sizes.split(",")]:
        setup = CArmSetup().at_size(size)
        intr = setup.intrinsics()
        K = intr.K(torch.float64)
        T = view_pose(center, setup, args.view)
        seq = simulate_sequence(xray_renderer(ct), intr, T[None], XrayDegradation(), seed=0)
        img = to_attenuation(seq.images[0].astype(np.float32), seq.intensity)
        img_t = torch.from_numpy(img)
        cfg = TRACKING_CONFIG
        gf = gradient_image(img_t, cfg.smooth_sigma_px).double()
        c, gm = reg.contours_at(T, intr, cfg, whole_image=False)
        gm = gm.double()
        uv_c, score, _, _ = ngc_search(gf, gm, c.uv, c.normal_2d, cfg.search_px[0], cfg.patch_half, cfg.patch_half_along)
        w = score.clamp(min=0)
        n = len(c)
        g = "ppc"
        add(size, g, "fixed gradient", "torch-cpu", lambda: gradient_image(img_t, cfg.smooth_sigma_px))
        add(size, g, "moving DRR + gradient (band, as tracked)", "torch-cpu", lambda: reg.moving_gradient(T, intr, around_uv=c.uv))
        add(size, g, "moving DRR + gradient (whole frame)", "torch-cpu", lambda: reg.moving_gradient(T, intr))
        add(size, g, "contour selection", "torch-cpu",
            lambda: select_contours(reg.pts, reg.normals, T, K, size, size, max_cos=cfg.max_cos, margin_px=cfg.patch_half + 1))
        add(size, g, f"NGC search ({n} points)", "torch-cpu", lambda: ngc_search(gf, gm, c.uv, c.normal_2d, cfg.search_px[0], cfg.patch_half, cfg.patch_half_along))
        add(size, g, "PPC solve (MCCR)", "torch-cpu", lambda: solve_ppc(c.w_opt[None], c.g_opt[None], uv_c[None], K, w[None], robust="mccr"))
        add(size, g, "whole update", "torch-cpu", lambda: reg.update(T, gf.float(), intr, cfg.search_px[0], config=cfg, T_anchor=T))
        add(size, g, "track() per frame (in-plane update only)", "torch-cpu", lambda: reg.track(img, intr, T))
        node_track = ppc_configs(PipelineConfig())[1]  # the node's default tracking update
        add(size, g, f"track() per frame (node default: {node_track.max_iterations[0]} updates)", "torch-cpu",
            lambda: reg.track(img, intr, T, config=node_track))
        add(size, g, "peak check (confidence + in-plane correction)", "torch-cpu", lambda: peak_check(reg, img, intr, T, range_mm=PEAK_RANGE_MM))

        # networks at the sizes the node feeds them
        lv = _levels(PPCConfig(flow_levels=(0.25,)), intr)[0]  # (scale, iterations, search, nominal) of the coarsest level
        intr_q = intr.scaled(lv[0])
        corr = reg.correspond(T, gf.float(), intr, cfg.search_px[0], cfg)
        feats = correspondence_features(corr)[None]
        mask = torch.ones(feats.shape[:2], dtype=torch.bool)
        gfq = reg.fixed_gradients(img, [lv[0]])[lv[0]].to(torch.float64)
        cq, gmq = reg.contours_at(T, intr_q, None, whole_image=True)
        from reg2d3d_ros.nets.flownet import normalise_gradients

        h, w_ = gmq.shape[-2:]
        ph, pw = (-h) % 4, (-w_) % 4
        fq = torch.nn.functional.pad(normalise_gradients(gfq[None].float()), (0, pw, 0, ph))
        mq = torch.nn.functional.pad(normalise_gradients(gmq[None].float()), (0, pw, 0, ph))
        dp = torch.zeros(1, len(cq), 2, dtype=torch.float64)
        fa = attention_features(cq.uv[None], cq.normal_2d[None], cq.w_opt[None], cq.g_opt[None], dp, float(intr_q.fx), 6.0)
        ma = torch.ones(fa.shape[:2], dtype=torch.bool)
        x_scr = scr.network_input(img)
        for b, es in engines.items():
            ondev = (lambda t: t.to(dev)) if dev == "cuda" else (lambda t: t)
            add(size, "network", f"SCR U-Net {tuple(x_scr.shape[-2:])}", b, lambda: es["scr"](ondev(x_scr)), warmup=3)
            add(size, "network", f"PPC-L PointNet ({feats.shape[1]} points)", b, lambda: es["ppcl"](ondev(feats), ondev(mask)), warmup=3)
            add(size, "network", f"flow network {tuple(fq.shape[-2:])}", b, lambda: es["flow"](ondev(fq), ondev(mq)), warmup=3)
            add(size, "network", f"attention PointNet ({fa.shape[1]} points)", b, lambda: es["attention"](ondev(fa), ondev(ma)), warmup=3)
            flow_op.engines = {"flow": es["flow"], "attention": es["attention"]}
            add(size, "learned", "PPC Flow Attention update (level 0.25)", b,
                lambda: reg.update(T, gfq.float(), intr_q, 6, config=PPCConfig(flow_levels=(0.25,)), matcher=flow_op.matcher(), weighter=flow_op.weighter()))
            learned.engines = {0.25: es["ppcl"]}
            add(size, "learned", "PPC-L update (level 0.25)", b,
                lambda: reg.update(T, gfq.float(), intr_q, 6, config=PPCConfig(learned_levels=(0.25,)), weighter=learned.weighter(0.25)))
            scr.runner = es["scr"]
            parts = []

            def init_once():
                r = scr.initialise(img, K.numpy())
                parts.append((r.network_seconds * 1e3, r.pnp_seconds * 1e3))

            add(size, "scr", "SCR-PnP initialisation (whole)", b, init_once)
            arr = np.array(parts[2:])
            rows.append({"size": size, "group": "scr", "stage": "  of which network", "backend": b, "median_ms": round(float(np.median(arr[:, 0])), 2),
                         "p95_ms": round(float(np.percentile(arr[:, 0], 95)), 2)})
            rows.append({"size": size, "group": "scr", "stage": "  of which RANSAC PnP", "backend": b, "median_ms": round(float(np.median(arr[:, 1])), 2),
                         "p95_ms": round(float(np.percentile(arr[:, 1], 95)), 2)})

    from reg2d3d_ros.nets import count_parameters

    params = {f"{e.spec.name} ({k})": count_parameters(e.spec.module) for k, e in engines[backends[-1]].items()}
    info = {
        "parameters": params,
        "device": dev, "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name() if dev == "cuda" else "", "backends": backends, "vertebra": args.vertebra, "view": args.view,
        "repeats": args.repeats, "date": time.strftime("%Y-%m-%d"), "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"stages_{dev}.json").write_text(json.dumps(info, indent=1))
    hw = f"GPU {info['gpu']}, " if dev == "cuda" else ""
    lines = [f"# Stage benchmark ({dev})", "",
             f"{hw}{info['cpu']}, {info['threads']} torch threads, torch {info['torch']}, {info['date']}. Vertebra {args.vertebra}, "
             f"{args.view} view, simulated frames. Median and 95th percentile of {args.repeats} runs after warm-up. "
             "The PPC geometry runs on the CPU; networks on the device with each back-end.", "",
             "Parameters: " + ", ".join(f"{k} {v:,}" for k, v in params.items()) + ".", "",
             "| size | group | stage | back-end | median [ms] | p95 [ms] |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['size']} | {r['group']} | {r['stage']} | {r['backend']} | {r['median_ms']} | {r['p95_ms']} |" for r in rows]
    (args.out / f"stages_{dev}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / f'stages_{dev}.md'}")


if __name__ == "__main__":
    main()
