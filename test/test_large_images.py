"""Large frames cross the graph complete: 1024x1024 mono16 at 30 Hz, reliable and best-effort QoS.

Everything the project starts sets FASTDDS_BUILTIN_TRANSPORTS=LARGE_DATA (the node, replay and
record modules set it before rclpy loads; the launch file sets it for its processes). Here the
replay tool publishes a bag of such frames at 30 Hz from one process and the test process
subscribes with the same QoS. Reliable QoS must deliver every frame; best effort may drop
frames when a 2-core machine is busy (that is what it is for: the node only wants the newest),
but whatever arrives must be complete and byte-exact, and large frames must not be lost wholesale
(which is what happens to fragmented best-effort samples over plain UDP).
"""

import sys
import time

import numpy as np
import pytest

from ros_graph import TestGraph, graph_env, run_tool


@pytest.mark.parametrize("qos_name", ["reliable", "sensor"])
def test_1024_mono16_at_30hz_arrives_complete(tmp_path, qos_name):
    from rclpy.qos import QoSProfile, qos_profile_sensor_data
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
    env = graph_env(tmp_path)
    g = TestGraph(env)
    try:
        qos = qos_profile_sensor_data if qos_name == "sensor" else QoSProfile(depth=100)
        got = g.subscribe(Image, "/carm/image", qos)
        res = run_tool(
            [sys.executable, "-m", "reg2d3d_ros.ros.replay", str(bag), "--topics", "/carm/image", "--qos", qos_name, "--wait-subscribers", "1"],
            env, timeout=120,
        )
        assert res.returncode == 0, res.stderr
        time.sleep(1.0)
        with g.lock:
            msgs = [m for _, m in got]
        if qos_name == "reliable":
            assert len(msgs) == n, f"reliable QoS: {len(msgs)} of {n} frames arrived"
        else:
            assert len(msgs) >= n // 3, f"best effort: only {len(msgs)} of {n} frames arrived"
        seen = set()
        for m in msgs:
            assert (m.width, m.height, m.encoding, m.step) == (size, size, "mono16", 2 * size)
            k = (m.header.stamp.sec * 10**9 + m.header.stamp.nanosec - DEFAULT_START_NS) // (10**9 // 30)
            assert 0 <= k < n and k not in seen
            seen.add(k)
            assert np.array_equal(np.frombuffer(bytes(m.data), dtype="<u2").reshape(size, size), images[k]), f"frame {k} corrupt"
    finally:
        g.close()
