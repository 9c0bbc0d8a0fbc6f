"""Large frames cross the graph complete: 1024x1024 mono16 at 30 Hz, best-effort QoS.

Everything the project starts sets FASTDDS_BUILTIN_TRANSPORTS=LARGE_DATA (the node, replay and
record modules set it before rclpy loads; the launch file sets it for its processes). Here the
replay tool publishes a bag of such frames at 30 Hz from one process and the test process
subscribes with sensor-data QoS.
"""

import random
import subprocess
import sys
import time

import numpy as np

from ros_graph import REPO, TestGraph, graph_env


def test_1024_mono16_at_30hz_arrives_complete(tmp_path):
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import Image

    from reg2d3d_ros.geometry import CArmIntrinsics
    from reg2d3d_ros.sim.bag import write_sequence_bag
    from reg2d3d_ros.sim.sequence import DEFAULT_START_NS, SimulatedSequence

    n, size = 90, 1024
    rng = np.random.default_rng(0)
    images = rng.integers(0, 65535, size=(n, size, size), dtype=np.uint16)
    seq = SimulatedSequence(
        images=images, encoding="mono16", intensity="attenuation", poses_mm=np.tile(np.eye(4), (n, 1, 1)),
        intrinsics=CArmIntrinsics.from_detector(1020.0, 0.3, size, size),
        stamps_ns=DEFAULT_START_NS + np.arange(n, dtype=np.int64) * (10**9 // 30),
    )
    bag = write_sequence_bag(seq, tmp_path / "big")
    env = graph_env(tmp_path, random.randint(101, 230))
    g = TestGraph(env)
    try:
        got = g.subscribe(Image, "/carm/image", qos_profile_sensor_data)
        res = subprocess.run(
            [sys.executable, "-m", "reg2d3d_ros.replay", str(bag), "--topics", "/carm/image", "--qos", "sensor", "--wait-subscribers", "1"],
            env=env, cwd=REPO, capture_output=True, text=True, timeout=120,
        )
        assert res.returncode == 0, res.stderr
        time.sleep(1.0)
        with g.lock:
            msgs = [m for _, m in got]
        assert len(msgs) >= 0.95 * n, f"only {len(msgs)} of {n} frames arrived"
        first = msgs[0]
        assert (first.width, first.height, first.encoding) == (size, size, "mono16")
        k = (first.header.stamp.sec * 10**9 + first.header.stamp.nanosec - DEFAULT_START_NS) // (10**9 // 30)
        assert np.array_equal(np.frombuffer(bytes(first.data), dtype="<u2").reshape(size, size), images[k])
    finally:
        g.close()
