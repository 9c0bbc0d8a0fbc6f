"""The demo on the built-in example (README command 1), through the ROS 2 node.

Simulates a fluoroscopy sequence around one thoracic vertebra of the example CT (simulated
frames: there is no real X-ray with a known pose here) and writes it as a rosbag2 bag; starts the
registration node as a process on its own DDS domain with the example's SCR model
(``models/example_T8``), so that it initialises itself on the first frames (SCR-PnP, refined by
PPC; ``--init ground-truth`` gives it frame 0's true pose instead); replays the bag into it in real time
with the replay tool; collects the node's poses, TF and overlays; and reports the error of every
answered frame against the ground truth, the frames the node dropped (newest frame wins) or
judged lost, and the latency. Output: overlay PNGs drawn by the node, an error plot, the bag, the
node's log and a JSON summary, in a folder whose path it prints.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .errors import Reg2D3DError, run_cli


def build_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    ap = argparse.ArgumentParser(prog="python -m reg2d3d_ros.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("demo_output"), help="output folder (default: ./demo_output)")
    ap.add_argument("--vertebra", default="T8")
    ap.add_argument("--view", default="lateral")
    ap.add_argument("--init", choices=["scr", "ground-truth"], default="scr",
                    help="scr: the node initialises itself with its SCR model; ground-truth: publish frame 0's true pose")
    ap.add_argument("--models", type=Path, default=None, help="SCR model folder (default: the package's models/example_T8)")
    ap.add_argument("--frames", type=int, default=60)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--trajectory", default="smooth", choices=["static", "smooth", "carm_rotation", "jumps"])
    ap.add_argument("--objects", default="wire", choices=["none", "wire", "screw", "both"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rate", type=float, default=1.0, help="replay rate (1 = real time, 15 frames/s)")
    ap.add_argument("--lockstep", action="store_true",
                    help="send each frame after the node's pose of the previous one (every frame answered, whatever the load)")
    return ap


def _plot_errors(path: Path, errors: dict, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=110)
    for label, (x, values) in errors.items():
        ax.plot(x, values, ".-", label=label, markersize=3)
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

    from .eval import mrpd, mtre
    from .geometry import pose_m_to_transform
    from .example import example_paths
    from .sim import CArmSetup, XrayDegradation, make_objects, make_trajectory, simulate_sequence, structure_center, view_pose, xray_renderer
    from .sim.bag import write_sequence_bag
    from .volume import load_ct, resolve_label

    t_start = time.perf_counter()
    out = args.out.resolve()
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    ex = example_paths()
    print(f"[1/5] loading the example CT ({ex.ct.name}, LIDC-IDRI-0001) and labels", flush=True)
    ct = load_ct(ex.ct, labels_path=ex.labels, label_table=ex.label_table)
    label = resolve_label(args.vertebra, ct.label_names)
    target_pts = torch.from_numpy(ct.label_points_ct_mm([label], max_points=2000, seed=0))
    center = structure_center(ct, args.vertebra)

    print(f"[2/5] simulating {args.frames} frames around {args.vertebra} ({args.trajectory} motion, {args.view} view, "
          f"{args.size}x{args.size}, objects: {args.objects})", flush=True)
    setup = CArmSetup().at_size(args.size)
    T0 = view_pose(center, setup, args.view)
    poses = make_trajectory(args.trajectory, T0, args.frames, center, setup, view=args.view, seed=args.seed)
    renderer = xray_renderer(ct)
    seq = simulate_sequence(
        renderer, setup.intrinsics(), poses, XrayDegradation(), seed=args.seed,
        objects=make_objects(args.objects, center), progress=True,
        meta={"vertebra": args.vertebra, "view": args.view, "trajectory": args.trajectory},
    )
    bag = write_sequence_bag(seq, out / "sequence_bag", overwrite=True)
    print(f"      wrote the simulated sequence to {bag}", flush=True)

    from .ros.session import run_bag_through_node

    params = {"ct_path": ex.ct, "labels_path": ex.labels, "label_table_path": ex.label_table, "target": args.vertebra}
    T_gt = torch.from_numpy(seq.poses_mm)
    if args.init == "scr":
        models = (args.models or Path(__file__).resolve().parents[1] / "models" / "example_T8").resolve()
        if not (models / "scr.pt").is_file():
            raise Reg2D3DError(f"no SCR model in {models}: create one with python -m reg2d3d_ros.prepare, or use --init ground-truth")
        params["models_dir"] = models
    got = run_bag_through_node(bag, params, T_gt[0] if args.init == "ground-truth" else None, out, rate=args.rate, n_frames=len(seq),
                               log=lambda m: print(m, flush=True), lockstep=args.lockstep)
    poses, n_tf, overlays, diag = got["poses"], got["tf_messages"], got["overlays"], got["diagnostics"]

    print("[5/5] scoring the node's poses against the ground truth; writing overlays and the plot", flush=True)
    index = {int(s): i for i, s in enumerate(seq.stamps_ns)}
    answered, est = [], []
    for p in poses:
        i = index.get(p.header.stamp.sec * 10**9 + p.header.stamp.nanosec)
        if i is None:
            raise Reg2D3DError("the node published a pose whose stamp matches no frame (headers must be copied)")
        pp, q = p.pose.position, p.pose.orientation
        answered.append(i)
        est.append(pose_m_to_transform(torch.tensor([pp.x, pp.y, pp.z], dtype=torch.float64),
                                       torch.tensor([q.x, q.y, q.z, q.w], dtype=torch.float64)))
    if not est:
        raise Reg2D3DError(f"the node published no pose; its log: {out / 'node.log'}")
    T_est = torch.stack(est)
    idx = torch.tensor(answered)
    err_mrpd = mrpd(T_est, T_gt[idx], target_pts).numpy()
    err_mtre = mtre(T_est, T_gt[idx], target_pts).numpy()
    hold_mrpd = mrpd(T_gt[0].expand_as(T_gt), T_gt, target_pts).numpy()
    for m in overlays:
        i = index.get(m.header.stamp.sec * 10**9 + m.header.stamp.nanosec)
        if i is not None:
            rgb = np.frombuffer(bytes(m.data), np.uint8).reshape(m.height, m.width, 3)
            cv2.imwrite(str(out / "overlays" / f"frame_{i:03d}.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    _plot_errors(
        out / "error_per_frame.png",
        {"mRPD of the node's poses": (np.array(answered), err_mrpd), "mTRE of the node's poses": (np.array(answered), err_mtre),
         "mRPD if the first pose were held (no tracking)": (np.arange(len(seq)), hold_mrpd)},
        f"Simulated sequence, {args.vertebra} {args.view}, {args.trajectory} motion, through the node",
    )
    summary = {
        "simulated": True,
        "vertebra": args.vertebra,
        "view": args.view,
        "frames_replayed": len(seq),
        "poses_published": len(poses),
        "tf_messages": n_tf,
        "overlays_received": len(overlays),
        "frames_dropped_newest_wins": int(diag.get("frames_dropped", 0)),
        "node_state_at_end": diag.get("state"),
        "node_latency_ms_median": float(diag["latency_ms_median"]) if diag.get("latency_ms_median") else None,
        "initialisation": ("SCR-PnP (models: " + str(params["models_dir"]) + "), refined by PPC") if args.init == "scr"
        else "ground truth of frame 0 on /registration/initial_pose",
        "first_answered_frame": int(min(answered)),
        "tracking": "classic PPC, one in-plane update per frame",
        "mrpd_mm": {"median": float(np.median(err_mrpd)), "p95": float(np.percentile(err_mrpd, 95)), "max": float(err_mrpd.max())},
        "mtre_mm": {"median": float(np.median(err_mtre)), "max": float(err_mtre.max())},
        "mrpd_if_held_mm": {"median": float(np.median(hold_mrpd[1:])), "max": float(hold_mrpd.max())},
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"      {len(poses)} poses for {len(seq)} frames ({summary['frames_dropped_newest_wins']} dropped: newest frame wins), "
          f"node latency median {summary['node_latency_ms_median']} ms, state at the end: {summary['node_state_at_end']}")
    print(f"      error of the published poses: median mRPD {summary['mrpd_mm']['median']:.2f} mm (max {summary['mrpd_mm']['max']:.2f}); "
          f"holding the first pose would give median {summary['mrpd_if_held_mm']['median']:.2f} mm (simulated frames)")
    print(f"done in {summary['seconds']} s; overlays (drawn by the node), plot, bag and node log in:\n{out}")
    return out


def main(argv=None) -> int:
    """Entry point."""
    args = build_parser().parse_args(argv)
    return run_cli(lambda: run(args), "python -m reg2d3d_ros.demo")


if __name__ == "__main__":
    sys.exit(main())
