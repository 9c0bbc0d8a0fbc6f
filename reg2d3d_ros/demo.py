"""The demo on the built-in example (README command 1).

Simulates a 60-frame fluoroscopy sequence around one thoracic vertebra of the example CT
(simulated frames: there is no real X-ray with a known pose here), runs it through the
registration that exists, and writes overlay PNGs, a plot of the error per frame, the
sequence as a rosbag2 bag and a JSON summary to an output folder whose path it prints.

Registration available now: the ground truth of frame 0 is used as the initial pose (the SCR
initialiser is not implemented yet) and frame-to-frame tracking is not implemented yet; the
error plot therefore shows what holding the initial pose would cost, labelled as such.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .errors import Reg2D3DError


def build_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    ap = argparse.ArgumentParser(prog="python -m reg2d3d_ros.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("demo_output"), help="output folder (default: ./demo_output)")
    ap.add_argument("--vertebra", default="T8")
    ap.add_argument("--view", default="ap")
    ap.add_argument("--frames", type=int, default=60)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--trajectory", default="smooth", choices=["static", "smooth", "carm_rotation", "jumps"])
    ap.add_argument("--objects", default="wire", choices=["none", "wire", "screw", "both"])
    ap.add_argument("--seed", type=int, default=0)
    return ap


def _plot_errors(path: Path, errors: dict, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=110)
    for label, values in errors.items():
        ax.plot(np.arange(len(values)), values, label=label)
    ax.set_xlabel("frame")
    ax.set_ylabel("error [mm]")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run(args) -> Path:
    """Run the demo; returns the output folder."""
    import cv2

    from .drr import DRRRenderer
    from .eval import mrpd, mtre
    from .example import example_paths
    from .images import to_attenuation
    from .sim import CArmSetup, XrayDegradation, make_objects, make_trajectory, simulate_sequence, structure_center, view_pose
    from .sim.bag import write_sequence_bag
    from .viz import GREEN, RED, contours_of, draw_overlay, projected_mask
    from .volume import load_ct, resolve_label

    t_start = time.perf_counter()
    out = args.out.resolve()
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    ex = example_paths()
    print(f"[1/4] loading the example CT ({ex.ct.name}, LIDC-IDRI-0001) and labels", flush=True)
    ct = load_ct(ex.ct, labels_path=ex.labels, label_table=ex.label_table)
    label = resolve_label(args.vertebra, ct.label_names)
    roi = ct.crop_to_labels([label], margin_mm=15.0)
    target_pts = torch.from_numpy(ct.label_points_ct_mm([label], max_points=2000, seed=0))
    center = structure_center(ct, args.vertebra)

    print(f"[2/4] simulating {args.frames} frames around {args.vertebra} ({args.trajectory} motion, {args.view} view, "
          f"{args.size}x{args.size}, objects: {args.objects})", flush=True)
    setup = CArmSetup().at_size(args.size)
    T0 = view_pose(center, setup, args.view)
    poses = make_trajectory(args.trajectory, T0, args.frames, center, setup, view=args.view, seed=args.seed)
    renderer = DRRRenderer.from_volume(ct.binned((2, 2, 1)))
    seq = simulate_sequence(
        renderer, setup.intrinsics(), poses, XrayDegradation(), seed=args.seed,
        objects=make_objects(args.objects, center), progress=True,
        meta={"vertebra": args.vertebra, "view": args.view, "trajectory": args.trajectory},
    )
    bag = write_sequence_bag(seq, out / "sequence_bag", overwrite=True)
    print(f"      wrote the simulated sequence to {bag}", flush=True)

    print("[3/4] registering", flush=True)
    print("      initialisation: ground truth of frame 0 (the SCR initialiser is not implemented yet)")
    print("      tracking: NOT IMPLEMENTED YET - the pose is held at the initial pose for every frame;")
    print("                the errors below are the cost of not tracking, not a tracking result")
    T_gt = torch.from_numpy(seq.poses_mm)
    T_est = T_gt[0].expand_as(T_gt).clone()
    err_mtre = mtre(T_est, T_gt, target_pts).numpy()
    err_mrpd = mrpd(T_est, T_gt, target_pts).numpy()

    print("[4/4] writing overlays and the error plot", flush=True)
    K = seq.intrinsics.K()
    mask_renderer = DRRRenderer(torch.from_numpy(roi.label_mask([label]).astype(np.float32)), roi.T_ct_from_ijk)
    H, W = seq.intrinsics.height, seq.intrinsics.width
    for f in range(len(seq)):
        frame = to_attenuation(seq.images[f], seq.intensity)
        gt_c = contours_of(projected_mask(mask_renderer, T_gt[f], K, H, W))
        est_c = contours_of(projected_mask(mask_renderer, T_est[f], K, H, W))
        rgb = draw_overlay(frame, [(gt_c, RED), (est_c, GREEN)])
        cv2.imwrite(str(out / "overlays" / f"frame_{f:03d}.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    _plot_errors(
        out / "error_per_frame.png",
        {"mTRE, initial pose held (no tracking yet)": err_mtre, "mRPD, initial pose held (no tracking yet)": err_mrpd},
        f"Simulated sequence, {args.vertebra}, {args.trajectory} motion: error per frame",
    )
    summary = {
        "simulated": True,
        "vertebra": args.vertebra,
        "frames": len(seq),
        "initialisation": "ground truth of frame 0 (SCR not implemented yet)",
        "tracking": "not implemented yet (pose held)",
        "mtre_mm": {"median": float(np.median(err_mtre)), "max": float(err_mtre.max())},
        "mrpd_mm": {"median": float(np.median(err_mrpd)), "max": float(err_mrpd.max())},
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"      holding the initial pose: median mTRE {summary['mtre_mm']['median']:.2f} mm, "
          f"max {summary['mtre_mm']['max']:.2f} mm (simulated motion)")
    print(f"done in {summary['seconds']} s; overlays (red: ground truth, green: estimate), plot and bag in:\n{out}")
    return out


def main(argv=None) -> int:
    """Entry point."""
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except Reg2D3DError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
