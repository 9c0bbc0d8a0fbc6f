"""The tests' harness for the node on a real ROS 2 graph (used by the node tests and ``benchmarks/bench_node.py``).

Builds on the package's client (:mod:`reg2d3d_ros.ros.client`: own domain, node process, participant)
and adds what only tests need: processes run in the repository (:data:`REPO`), failure reports
with a process's log, and image messages made from arrays and simulated sequences.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np

from reg2d3d_ros.ros.client import GraphClient, dump_stacks_and_kill, graph_env, last_diagnostics, pick_domain_id, pose_msg, stop_process  # noqa: F401
from reg2d3d_ros.ros.client import run_tool as _run_tool
from reg2d3d_ros.ros.client import start_node as _start_node

REPO = Path(__file__).resolve().parents[1]


class TestGraph(GraphClient):
    """The test's participant (:class:`~reg2d3d_ros.ros.client.GraphClient`) in the test's domain."""

    __test__ = False  # not a pytest class
    NODE_NAME = "reg2d3d_test_graph"


def start_node(env: dict, params: dict, log_path: Path) -> subprocess.Popen:
    """Start the node with parameters as a real process, in the repository."""
    return _start_node(env, params, log_path, cwd=REPO)


def run_tool(args: list, env: dict, timeout: float, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """:func:`reg2d3d_ros.ros.client.run_tool`, in the repository unless ``cwd`` is given."""
    return _run_tool(args, env, timeout, cwd=cwd)


def process_report(proc: subprocess.Popen, log_path: Path, lines: int = 40) -> str:
    """Exit status and the last ``lines`` lines of a process's log (for a failure message)."""
    rc = proc.poll()
    state = "running" if rc is None else f"exited with {rc}"
    try:
        tail = Path(log_path).read_text(errors="replace").splitlines()[-lines:]
    except OSError as e:
        tail = [f"(log unreadable: {e})"]
    return f"process {proc.pid} {state}; last lines of {log_path}:\n" + "\n".join("  | " + l for l in tail)


def image_msg(arr: np.ndarray, encoding: str, stamp_ns: int, frame_id: str = "carm_optical"):
    """A sensor_msgs/Image of an array (any dtype matching the encoding's size)."""
    from sensor_msgs.msg import Image

    msg = Image()
    msg.header.stamp.sec, msg.header.stamp.nanosec = int(stamp_ns // 10**9), int(stamp_ns % 10**9)
    msg.header.frame_id = frame_id
    msg.height, msg.width = arr.shape[:2]
    msg.encoding = encoding
    msg.is_bigendian = 0
    msg.step = arr.strides[0]
    msg.data = np.ascontiguousarray(arr).tobytes()
    return msg


def sequence_frame_msg(seq, i: int, stamp_ns: int | None = None):
    """Frame ``i`` of a simulated sequence as a ``sensor_msgs/Image`` (its encoding; its stamp unless given)."""
    from reg2d3d_ros.images import encode_image

    f = encode_image(seq.images[i], seq.encoding)
    dtype = {"mono8": np.uint8, "mono16": np.uint16, "32FC1": np.float32}[f["encoding"]]
    arr = np.frombuffer(f["data"], dtype).reshape(f["height"], f["width"])
    return image_msg(arr, f["encoding"], int(seq.stamps_ns[i]) if stamp_ns is None else stamp_ns, seq.frame_id)
