"""``python -m reg2d3d_ros.eval.run_scr``: evaluate the SCR-PnP initialiser on held-out views.

Held-out views are drawn from the same view distribution as the training views but with another
seed (so no view or offset of the test set was seen in training), rendered at the network's
size, and degraded with a fixed seed per view. For each view the SCR initialiser (and, when its
model exists, the pose-regression baseline) gives a pose; the table reports mTRE over the target
vertebra's voxels at the 25th/50th/95th percentiles, the gross failure rate (mTRE > 10 mm or no
pose), how often the node's acceptance test let a gross failure through, and the time per
initialisation split into network and PnP. Times are taken on frames of ``--frame-size`` pixels
(the held-out frame resized, since the network sees ``size x size`` anyway).

Usage::

    python -m reg2d3d_ros.eval.run_scr --models models/example_T8 --views build/prep_T8/cache/views_test
        [--posenet build/prep_T8/cache/posenet.pt] [--out reports/scr]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, ModelLoadError, run_cli
from .metrics import percentiles


def load_posenet(path, device: str = "cpu"):
    """The pose-regression baseline from its file (``weights_only`` load)."""
    from ..nets import PoseRegressionNet

    blob = torch.load(path, map_location=device, weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != "reg2d3d_posenet":
        raise ModelLoadError(f"{path} is not a pose-regression model of reg2d3d_ros")
    meta = json.loads(blob["meta_json"])
    net = PoseRegressionNet(widths=meta["widths"], center_ct_mm=meta["center_ct_mm"], depth_mm=meta["depth_mm"], scale_mm=meta["scale_mm"])
    net.load_state_dict(blob["state_dict"])
    return net.eval(), meta


def evaluate(models_dir: Path, views_dir: Path, posenet_path: Path | None, frame_size: int, limit: int | None, seed: int, backend: str,
             start: int = 0, acceptance=None) -> dict:
    """Run the evaluation on views ``start .. start + limit``; returns the results dictionary."""
    from ..engines import load
    from ..geometry import CArmIntrinsics
    from ..scr.data import load_views, view_frame
    from ..scr.model import SCRInitializer
    from .metrics import mrpd

    model = SCRInitializer.load(models_dir / "scr.pt", acceptance=acceptance)
    if backend != "pytorch":
        model.runner = load(models_dir / "scr.pt", "scr", backend, "cpu")
    spec = json.loads((views_dir / "spec.json").read_text())
    files = sorted(views_dir.glob("views_*.npz"))
    if not files:
        raise ConfigError(f"no cached views in {views_dir}")
    views = load_views(files)
    n_all = len(views["poses"])
    n = n_all - start if limit is None else min(limit, n_all - start)
    surf = np.load(models_dir / f"surface_{model.meta['target']}.npz")
    pts = torch.from_numpy(surf["target_pts_ct_mm"])
    size = int(spec["size"])
    intr_frame = CArmIntrinsics.from_detector(spec["sdd_mm"], spec["pixel_spacing_mm"] * size / frame_size, frame_size, frame_size)
    K = intr_frame.K(torch.float64).numpy()
    intr_views = CArmIntrinsics.from_detector(spec["sdd_mm"], spec["pixel_spacing_mm"], size, size)
    posenet = load_posenet(posenet_path)[0] if posenet_path is not None and posenet_path.exists() else None
    rows = []
    for i in range(start, start + n):
        rng = np.random.default_rng((seed, i))
        img = view_frame(views, i, rng, intr_views)
        frame = torch.nn.functional.interpolate(torch.from_numpy(img)[None, None], size=(frame_size, frame_size), mode="bilinear",
                                                align_corners=False)[0, 0].numpy() if frame_size != size else img
        T_gt = torch.from_numpy(views["poses"][i])
        r = model.initialise(frame, K, seed=i)
        err = err_rpd = float("inf")
        if r.T_optical_from_ct is not None:
            err = _mtre(r.T_optical_from_ct, T_gt, pts)
            err_rpd = float(mrpd(r.T_optical_from_ct.double(), T_gt.double(), pts))
        row = {"view": i, "mtre_mm": err, "mrpd_mm": err_rpd, "accepted": r.accepted, "inliers": r.pnp.n_inliers, "inlier_fraction": r.confidence,
               "confident": r.n_confident, "network_s": r.network_seconds, "pnp_s": r.pnp_seconds, "why": r.why}
        if posenet is not None:
            t0 = time.perf_counter()
            with torch.no_grad():
                T_p = posenet(model.network_input(frame))[0].double()
            row["posenet_s"] = time.perf_counter() - t0
            row["posenet_mtre_mm"] = _mtre(T_p, T_gt, pts)
        rows.append(row)
        print(f"\rview {i + 1 - start}/{n}: SCR mTRE {err:7.2f} mm {'accepted' if r.accepted else 'rejected'}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return {"rows": rows, "spec": spec, "frame_size": frame_size, "backend": backend, "acceptance": vars(model.acceptance), "model_meta": {k: v for k, v in model.meta.items() if k != "training"},
            "training": model.meta.get("training", {})}


def evaluate_refined(model, views: dict, pts: torch.Tensor, ct_path: str, labels: str, label_table: str | None, n: int, frame_size: int,
                     seed: int) -> list:
    """SCR followed by PPC registration (what the node does) on the first ``n`` held-out poses.

    The held-out poses are rendered again at ``frame_size`` through the whole CT (the
    simulator's X-ray renderer), degraded, initialised by SCR and, when accepted, registered by
    PPC from the SCR pose; returns per view the mTRE/mRPD before and after, and PPC's inlier fraction.
    """
    from ..geometry import CArmIntrinsics
    from ..ppc import PPCRegistrator
    from ..sim import XrayDegradation, xray_renderer
    from ..sim.degrade import degrade
    from ..sim.sequence import render_line_integrals
    from ..volume import load_ct
    from .metrics import mrpd

    ct = load_ct(ct_path, labels_path=labels, label_table=label_table)
    renderer = xray_renderer(ct)
    reg = PPCRegistrator.from_ct(ct, model.meta["target"])
    det_mm = float(model.meta.get("detector_mm", 307.2))
    intr = CArmIntrinsics.from_detector(float(model.meta.get("sdd_mm", 1020.0)), det_mm / frame_size, frame_size, frame_size)
    K = intr.K(torch.float64)
    rows = []
    for i in range(n):
        T_gt = torch.from_numpy(views["poses"][i])
        L = render_line_integrals(renderer, intr, T_gt[None])[0]
        img = degrade(L, XrayDegradation(encoding="32FC1"), np.random.default_rng((seed, 10_000 + i)))
        r = model.initialise(img, K.numpy(), seed=i)
        row = {"view": i, "accepted": r.accepted, "scr_mtre_mm": _mtre(r.T_optical_from_ct, T_gt, pts) if r.T_optical_from_ct is not None else float("inf")}
        if r.accepted:
            res = reg.register(img, intr, r.T_optical_from_ct)
            row.update(ppc_mtre_mm=_mtre(res.T_optical_from_ct, T_gt, pts), ppc_mrpd_mm=float(mrpd(res.T_optical_from_ct, T_gt, pts)),
                       ppc_inlier_fraction=res.inlier_fraction, ppc_seconds=res.seconds,
                       scr_mrpd_mm=float(mrpd(r.T_optical_from_ct, T_gt, pts)))
        rows.append(row)
        print(f"\rrefined {i + 1}/{n}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return rows


def _mtre(T_est, T_gt, pts) -> float:
    from .metrics import mtre

    return float(mtre(T_est.double(), T_gt.double(), pts))


def summarise(res: dict) -> dict:
    """Table numbers from the rows."""
    rows = res["rows"]
    e = np.array([r["mtre_mm"] for r in rows])
    acc = np.array([r["accepted"] for r in rows])
    out = {
        "n": len(rows),
        "scr": {**percentiles(e), "gfr": float(np.mean(~(e <= 10.0))), "mrpd": percentiles([r["mrpd_mm"] for r in rows]), "accepted": float(acc.mean()),
                "false_accept": float(np.mean(acc & ~(e <= 10.0))), "gfr_of_accepted": float(np.mean(~(e[acc] <= 10.0))) if acc.any() else float("nan"),
                "p50_of_accepted": float(np.median(e[acc])) if acc.any() else float("nan"),
                "network_ms": 1000 * float(np.median([r["network_s"] for r in rows])), "pnp_ms": 1000 * float(np.median([r["pnp_s"] for r in rows])),
                "total_ms_p95": 1000 * float(np.percentile([r["network_s"] + r["pnp_s"] for r in rows], 95))},
    }
    ref = res.get("refined") or []
    if ref:
        acc = [r for r in ref if r["accepted"]]
        after = np.array([r["ppc_mrpd_mm"] for r in acc]) if acc else np.array([np.inf])
        out["refined"] = {"n": len(ref), "accepted": len(acc) / len(ref),
                          "scr_mtre_p50": float(np.median([r["scr_mtre_mm"] for r in ref])),
                          "scr_mrpd_p50_accepted": float(np.median([r["scr_mrpd_mm"] for r in acc])) if acc else float("nan"),
                          "ppc_mrpd_p50": float(np.median(after)), "ppc_mtre_p50": float(np.median([r["ppc_mtre_mm"] for r in acc])) if acc else float("nan"),
                          "ppc_success": float(np.mean(after < 2.0)), "ppc_gross": float(np.mean(after > 10.0)),
                          "ppc_seconds_median": float(np.median([r["ppc_seconds"] for r in acc])) if acc else float("nan")}
    if rows and "posenet_mtre_mm" in rows[0]:
        p = np.array([r["posenet_mtre_mm"] for r in rows])
        out["posenet"] = {**percentiles(p), "gfr": float(np.mean(~(p <= 10.0))), "network_ms": 1000 * float(np.median([r["posenet_s"] for r in rows]))}
    return out


def write_report(out: Path, res: dict, summary: dict, argv: str) -> None:
    """``report.md`` and ``results.json``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"summary": summary, **res}, indent=1, default=float))
    s = summary["scr"]
    tr = res.get("training", {})
    lines = [
        "# SCR-PnP initialisation: held-out simulated views", "",
        f"Command: `python -m reg2d3d_ros.eval.run_scr {argv}`  ",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, CPU; back-end {res['backend']}; date {time.strftime('%Y-%m-%d')}.", "",
        f"{summary['n']} held-out views (seed {res['spec']['seed']}, never used in training), target {res['model_meta'].get('target')}, "
        f"views: LAO/RAO {res['spec']['views']['lao_deg']} deg, cranial {res['spec']['views']['cran_deg']} deg, isocentre offset sigma "
        f"{res['spec']['views']['offset_sigma_mm']} mm (anatomy often partly outside the field), SID {res['spec']['views']['sid_mm']} mm; "
        f"degraded with random dose, scatter, blur, gain and occlusion. mTRE over the target vertebra's voxels. Frames are "
        f"{res['frame_size']}x{res['frame_size']} (the network sees {res['spec']['size']}x{res['spec']['size']}).", "",
        "| method | mTRE p25 (mm) | p50 (mm) | p95 (mm) | GFR (mTRE > 10 mm or no pose) | time per initialisation |",
        "|---|---|---|---|---|---|",
        f"| SCR + RANSAC PnP (ours) | {s['p25']:.2f} | {s['p50']:.2f} | {s['p95']:.2f} | {100 * s['gfr']:.1f} % | "
        f"{s['network_ms']:.0f} ms network + {s['pnp_ms']:.0f} ms PnP (median); p95 total {s['total_ms_p95']:.0f} ms |",
    ]
    if "posenet" in summary:
        p = summary["posenet"]
        lines.append(f"| pose regression (PoseNet-style baseline, same data) | {p['p25']:.2f} | {p['p50']:.2f} | {p['p95']:.2f} | "
                     f"{100 * p['gfr']:.1f} % | {p['network_ms']:.0f} ms |")
    lines += [
        "| seed paper (SCR, pelvis, 6 specimens, mean) | 2.14 | 3.79 | 14.13 | 11.8 % | 1.75 s |", "",
        f"mTRE is a 3-D error; most of it lies along the beam (depth), which one view constrains poorly: the reprojection distance "
        f"(mRPD, the error a projection overlay shows) of the same SCR poses is p25 {s['mrpd']['p25']:.2f}, p50 {s['mrpd']['p50']:.2f}, "
        f"p95 {s['mrpd']['p95']:.2f} mm.", "",
        "## Acceptance (what the node does with the pose)", "",
        f"The node accepts an SCR pose when RANSAC keeps enough inliers (see `SCRAcceptance`). Accepted: {100 * s['accepted']:.1f} % of views; "
        f"median mTRE of accepted poses {s['p50_of_accepted']:.2f} mm; gross failures among accepted poses {100 * s['gfr_of_accepted']:.1f} %; "
        f"gross failures accepted, as a fraction of all views: {100 * s['false_accept']:.1f} %. A rejected view publishes no pose; the node "
        "tries again on the next frame.", "",
    ]
    if "refined" in summary:
        f = summary["refined"]
        lines += ["## SCR, then PPC registration (what the node does on its first frame)", "",
                  f"The first {f['n']} held-out poses rendered again at {res.get('refine_size')}x{res.get('refine_size')} through the whole CT, "
                  f"degraded, initialised by SCR and, when accepted ({100 * f['accepted']:.0f} %), registered by PPC from the SCR pose. "
                  f"Median mRPD of the accepted SCR poses {f['scr_mrpd_p50_accepted']:.2f} mm; after PPC: median mRPD {f['ppc_mrpd_p50']:.2f} mm, "
                  f"median mTRE {f['ppc_mtre_p50']:.2f} mm; mRPD < 2 mm in {100 * f['ppc_success']:.0f} % and > 10 mm in {100 * f['ppc_gross']:.0f} % "
                  f"of the accepted views; PPC {1000 * f['ppc_seconds_median']:.0f} ms median.", ""]
    if tr:
        hist = tr.get("history", [])
        cfg = tr.get("config", {})
        lines += ["## How the model was trained", "",
                  f"{tr.get('views', {}).get('n_views')} training views (seed {tr.get('views', {}).get('seed')}), {cfg.get('epochs')} epochs, "
                  f"batch {cfg.get('batch_size')}, Adam lr {cfg.get('lr')}, U-Net widths {cfg.get('widths')} stride {cfg.get('stride')}, "
                  f"device {tr.get('device')}, {tr.get('seconds')} s in all (rendering and training)."]
        if hist:
            h = hist[-1]
            lines.append(f"Last epoch: validation loss {h['val_loss']:.3f}, mean scene-coordinate error on hit pixels {h['val_err_mm']:.2f} mm.")
        lines.append("")
    (out / "report.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    """Entry point."""
    ap = argparse.ArgumentParser(prog="python -m reg2d3d_ros.eval.run_scr", description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=Path, required=True, help="model folder written by python -m reg2d3d_ros.prepare")
    ap.add_argument("--views", type=Path, required=True, help="held-out view cache (python -m reg2d3d_ros.prepare --test-views N writes OUT/cache/views_test)")
    ap.add_argument("--posenet", type=Path, default=None, help="pose-regression baseline file")
    ap.add_argument("--out", type=Path, default=Path("reports/scr"))
    ap.add_argument("--frame-size", type=int, default=256)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--seed", type=int, default=4242, help="seed of the degradations")
    ap.add_argument("--backend", choices=["pytorch", "onnxruntime"], default="onnxruntime")
    ap.add_argument("--refine", type=int, default=0, help="also run SCR + PPC registration on this many held-out poses")
    ap.add_argument("--refine-size", type=int, default=256, help="frame size for --refine")
    ap.add_argument("--ct", default=None, help="the CT (for --refine; default: the path stored in the model)")
    ap.add_argument("--labels", default=None, help="label map of the CT (for --refine)")
    ap.add_argument("--label-table", default=None, help="label names CSV (for --refine)")
    ap.add_argument("--start", type=int, default=0, help="first view (e.g. the training set's validation views, for tuning)")
    ap.add_argument("--max-log-sigma", type=float, default=None, help="override the model's confidence threshold (tuning)")
    ap.add_argument("--reprojection-px", type=float, default=None, help="override the RANSAC threshold at 256 px (tuning)")
    args = ap.parse_args(argv)

    def body():
        from dataclasses import replace

        from ..scr.model import SCRAcceptance

        acc = SCRAcceptance()
        if args.max_log_sigma is not None:
            acc = replace(acc, max_log_sigma=args.max_log_sigma)
        if args.reprojection_px is not None:
            acc = replace(acc, reprojection_px_at_256=args.reprojection_px)
        res = evaluate(args.models, args.views, args.posenet, args.frame_size, args.limit, args.seed, args.backend, args.start, acc)
        if args.refine > 0:
            from ..scr.data import load_views
            from ..scr.model import SCRInitializer

            model = SCRInitializer.load(args.models / "scr.pt", acceptance=acc)
            views = load_views(sorted(args.views.glob("views_*.npz")))
            pts = torch.from_numpy(np.load(args.models / f"surface_{model.meta['target']}.npz")["target_pts_ct_mm"])
            if not args.labels:
                raise ConfigError("--refine needs --labels (and --label-table) of the CT")
            res["refined"] = evaluate_refined(model, views, pts, args.ct or model.meta["ct"], args.labels, args.label_table, args.refine, args.refine_size, args.seed)
            res["refine_size"] = args.refine_size
        summary = summarise(res)
        write_report(args.out, res, summary, " ".join(argv if argv is not None else sys.argv[1:]))
        print(json.dumps(summary, indent=1))

    return run_cli(body, "python -m reg2d3d_ros.eval.run_scr")


if __name__ == "__main__":
    sys.exit(main())
