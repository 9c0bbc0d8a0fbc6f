"""Benchmark: per-frame latency of the node's pipeline on a tracked sequence (initialisation and tracking).

One randomised sequence of the generalisation benchmark's tuning split (T9, AP, smooth motion,
16 frames, 256x256) runs through :class:`reg2d3d_ros.pipeline.RegistrationPipeline` with the
node's defaults, frame 0 from its true pose on the initial-pose input. Prints the latency of
every frame and the medians, and appends one JSON line to ``benchmarks/results/tracking.jsonl``
(with the torch thread count, the git commit and the machine's load). Compare versions on the
same machine in the same minute: the numbers move with the machine's load.

Usage::

    python benchmarks/bench_tracking.py [--threads 1] [--profile]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from reg2d3d_ros.eval import benchmark as B
from reg2d3d_ros.eval.metrics import mrpd
from reg2d3d_ros.example import example_paths
from reg2d3d_ros.images import encode_image
from reg2d3d_ros.sim import CArmSetup
from reg2d3d_ros.volume import load_ct, resolve_label

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--profile", action="store_true", help="print the cProfile of the tracked frames")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ex = example_paths()
    ct = load_ct(ex.ct, labels_path=ex.labels, label_table=ex.label_table)
    setup = CArmSetup().at_size(B.SIZE)
    spec = B.SequenceSpec("tuning", "randomised", "T9", "ap", "smooth", 16, "true", 1002)
    poses = B.sequence_poses(ct, spec, setup)
    frames, enc, intensity, _ = B.sequence_frames(ct, str(ex.ct), spec, setup, poses, {})
    pipe = B.make_pipeline(str(ex.ct), str(ex.labels), str(ex.label_table), spec.vertebra, {}, intensity)
    pts = torch.from_numpy(ct.label_points_ct_mm([resolve_label(spec.vertebra, ct.label_names)], max_points=1000, seed=0))
    ci = setup.intrinsics().to_camera_info()
    pipe.set_camera_info(ci["k"], ci["width"], ci["height"])
    pipe.set_initial_pose(poses[0])
    prof = None
    if args.profile:
        import cProfile

        prof = cProfile.Profile()
    times, modes = [], []
    for f in range(len(frames)):
        e = encode_image(frames[f], enc)
        if prof is not None and f >= 2:
            prof.enable()
        t0 = time.perf_counter()
        r = pipe.process(e["encoding"], e["height"], e["width"], e["step"], e["data"])
        dt = time.perf_counter() - t0
        if prof is not None and f >= 2:
            prof.disable()
        times.append(1000 * dt)
        modes.append(r.mode)
        err = float(mrpd(r.T_registered, poses[f], pts)) if r.T_registered is not None else float("nan")
        print(f"frame {f:2d} {r.mode:28s} {1000 * dt:7.0f} ms  published {r.T_optical_from_ct is not None}  mRPD {err:.2f} mm")
    track = [t for t, m in zip(times, modes) if m == "track"]
    init = [t for t, m in zip(times, modes) if m.startswith("initialise")]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    row = {"commit": commit, "threads": args.threads, "track_ms_median": round(float(np.median(track)), 1) if track else None,
           "init_ms": [round(t, 1) for t in init], "frames": len(times), "load_1min": round(os.getloadavg()[0], 2),
           "cpu": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d %H:%M")}
    print(json.dumps(row))
    out = REPO / "benchmarks" / "results" / "tracking.jsonl"
    with open(out, "a") as fh:
        fh.write(json.dumps(row) + "\n")
    if prof is not None:
        import pstats

        pstats.Stats(prof).sort_stats("cumulative").print_stats(25)


if __name__ == "__main__":
    main()
