"""End-to-end benchmark of the registration node on a real DDS graph (CPU).

For each frame size, a simulated smooth-motion sequence (T7 lateral view of the example CT,
mono16) is fed to the node running as its own process:

* lock-step: publish a frame, wait for its pose; end-to-end latency = frame publish -> pose
  receipt at the client (tracking frames; frame 0 is the initialisation and reported apart);
* sustained: frames published at 30 Hz for ``--seconds`` s; poses received per second (the node's
  sustained rate, newest frame wins), latency under that load, frames dropped, RSS at start and end.

Results go to ``benchmarks/results/node_<device>.json`` and ``.md``. Run::

    .venv/bin/python benchmarks/bench_node.py [--sizes 256 512] [--seconds 15]
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

RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "test"))  # the node harness, test/ros_graph.py


def simulate(size: int, n_frames: int):
    """A simulated sequence at ``size`` pixels and the node parameters."""
    from reg2d3d_ros.eval.cases import CaseSet, make_cases
    from reg2d3d_ros.example import example_paths, load_example
    from reg2d3d_ros.sim import CArmSetup, XrayDegradation, make_trajectory, simulate_sequence, structure_center, xray_renderer

    ct = load_example()
    setup = CArmSetup().at_size(size)
    T0 = make_cases(ct, CaseSet("t", ("T7",), views=("lateral",), seed=1001), 1, setup=setup)[0].T_gt
    poses = make_trajectory("smooth", T0, n_frames, structure_center(ct, "T7"), setup, seed=7)
    seq = simulate_sequence(xray_renderer(ct), setup.intrinsics(), poses, XrayDegradation(), seed=7)
    ex = example_paths()
    params = {"ct_path": ex.ct, "labels_path": ex.labels, "label_table_path": ex.label_table, "target": "T7",
              "publish_overlay": False, "diagnostics_period": 0.5}
    return seq, params


def stamp_of(msg) -> int:
    return msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec


def bench_size(size: int, seconds: float, tmp: Path) -> dict:
    import psutil
    from geometry_msgs.msg import PoseStamped
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import CameraInfo, Image

    from ros_graph import TestGraph, graph_env, last_diagnostics, pose_msg, start_node, stop_process  # the tests' harness (test/)
    from ros_graph import sequence_frame_msg as frame_msg
    from diagnostic_msgs.msg import DiagnosticArray

    n_frames = 30
    seq, params = simulate(size, n_frames)
    env = graph_env(tmp, None)
    proc = start_node(env, params, tmp / f"node_{size}.log")
    g = TestGraph(env)
    try:
        poses = g.subscribe(PoseStamped, "/registration/pose")
        diag = g.subscribe(DiagnosticArray, "/diagnostics")
        g.wait_for(lambda: last_diagnostics(diag).get("state") == "initialising", 120.0, "node ready")
        img_pub = g.publisher(Image, "/carm/image", qos_profile_sensor_data)
        info_pub = g.publisher(CameraInfo, "/carm/camera_info", qos_profile_sensor_data)
        init_pub = g.publisher(PoseStamped, "/registration/initial_pose")
        ci = seq.intrinsics.to_camera_info()
        info = CameraInfo()
        info.header.frame_id = "carm_optical"
        info.width, info.height, info.k = ci["width"], ci["height"], [float(x) for x in ci["k"]]
        info_pub.publish(info)
        init_pub.publish(pose_msg(seq.poses_mm[0]))
        time.sleep(0.5)

        # lock-step
        lat = []
        t_init = None
        for i in range(n_frames):
            for attempt in range(6):  # a best-effort frame can be lost on the way: send it again
                t = time.monotonic()
                img_pub.publish(frame_msg(seq, i, int(seq.stamps_ns[i])))
                try:
                    g.wait_for(lambda: len(poses) > i, 15.0, f"pose of frame {i}")
                    break
                except TimeoutError:
                    if attempt == 5:
                        raise
            with g.lock:
                dt = poses[i][0] - t
            if i == 0:
                t_init = dt
            else:
                lat.append(dt)
        proc_ps = psutil.Process(proc.pid)
        rss0 = proc_ps.memory_info().rss

        # sustained: 30 Hz for `seconds`
        sent = {}
        n0 = len(poses)
        k = 0
        t_start = time.monotonic()
        while time.monotonic() - t_start < seconds:
            stamp = 1_900_000_000 * 10**9 + k * 10**6  # sec is int32
            sent[stamp] = time.monotonic()
            j = k % (2 * (n_frames - 2))  # ping-pong over frames 1..n-1: neighbours stay neighbours
            img_pub.publish(frame_msg(seq, 1 + (j if j < n_frames - 1 else 2 * (n_frames - 2) - j), stamp))
            k += 1
            time.sleep(max(0.0, t_start + k / 30.0 - time.monotonic()))
        t_stop = time.monotonic()
        time.sleep(3.0)
        rss1 = proc_ps.memory_info().rss
        with g.lock:
            got = [(t, stamp_of(p)) for t, p in poses[n0:]]
            d = last_diagnostics(diag)
        in_window = [t for t, s in got if s in sent and t <= t_stop]
        lat_load = [t - sent[s] for t, s in got if s in sent]
        alive = proc.poll() is None
    finally:
        g.close()
        stop_process(proc)
    return {
        "size": size,
        "initialisation_s": round(t_init, 3),
        "lockstep_latency_ms": {"median": 1e3 * float(np.median(lat)), "p95": 1e3 * float(np.percentile(lat, 95)), "frames": len(lat)},
        "lockstep_rate_hz": 1.0 / float(np.median(lat)),
        "sustained": {
            "published_hz": k / (t_stop - t_start),
            "poses_per_s": len(in_window) / (t_stop - t_start),
            "latency_ms_median": 1e3 * float(np.median(lat_load)) if lat_load else None,
            "latency_ms_p95": 1e3 * float(np.percentile(lat_load, 95)) if lat_load else None,
            "frames_sent": k,
            "frames_dropped_by_node": int(d.get("frames_dropped", 0)),
            "frames_processed_by_node": int(d.get("frames_processed", 0)),
            "node_state_at_end": d.get("state"),
            "rss_mib_start_end": [round(rss0 / 2**20), round(rss1 / 2**20)],
            "node_alive": alive,
        },
    }


def main(argv=None) -> int:
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--seconds", type=float, default=15.0)
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            d = Path(tmp) / str(size)
            d.mkdir()
            try:
                r = bench_size(size, args.seconds, d)
            except Exception:
                log = d / f"node_{size}.log"
                print(f"node log ({log}):\n" + (log.read_text()[-3000:] if log.exists() else "(none)"))
                raise
            rows.append(r)
            s = r["sustained"]
            print(f"{size}x{size}: lock-step latency median {r['lockstep_latency_ms']['median']:.0f} ms "
                  f"(p95 {r['lockstep_latency_ms']['p95']:.0f}), sustained {s['poses_per_s']:.1f} poses/s at {s['published_hz']:.0f} Hz input, "
                  f"latency under load median {s['latency_ms_median']:.0f} ms, RSS {s['rss_mib_start_end']} MiB", flush=True)
    meta = {"machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, {torch.get_num_threads()} torch threads (client)",
            "device": "cpu", "date": time.strftime("%Y-%m-%d"), "tracker": "ppc (TRACKING_CONFIG)", "encoding": "mono16"}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "node_cpu.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
    lines = ["# Node end-to-end benchmark (CPU)", "", f"{meta['machine']}, {meta['date']}; tracker {meta['tracker']}, mono16 frames.", "",
             "| size | init [s] | lock-step latency median / p95 [ms] | lock-step rate [Hz] | sustained poses/s (30 Hz input) | latency under load median / p95 [ms] | dropped / sent | RSS start -> end [MiB] |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r["sustained"]
        lines.append(f"| {r['size']} | {r['initialisation_s']:.2f} | {r['lockstep_latency_ms']['median']:.0f} / {r['lockstep_latency_ms']['p95']:.0f} | "
                     f"{r['lockstep_rate_hz']:.1f} | {s['poses_per_s']:.1f} | {s['latency_ms_median']:.0f} / {s['latency_ms_p95']:.0f} | "
                     f"{s['frames_dropped_by_node']} / {s['frames_sent']} | {s['rss_mib_start_end'][0]} -> {s['rss_mib_start_end'][1]} |")
    (RESULTS / "node_cpu.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {RESULTS / 'node_cpu.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
