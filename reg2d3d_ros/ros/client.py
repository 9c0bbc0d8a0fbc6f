"""A client of the registration node on a real ROS 2 graph: the node as a process, an isolated participant.

:func:`graph_env` gives each run its own ``ROS_DOMAIN_ID``, log folder and the large-data
transport; :func:`start_node` starts the node through its public entry point
(``python -m reg2d3d_ros.ros.node --ros-args -p ...``); :class:`GraphClient` is a participant
spinning in a background thread that collects ``(receive time, message)`` per topic. Used by
:mod:`.session` (the demo and ``trial``); the tests' harness (``test/ros_graph.py``) and the node
benchmark build on it.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path


_USED_DOMAINS: set[int] = set()


def _port_free(port: int) -> bool:
    """True if a UDP socket can bind ``port`` now (no other socket holds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.bind(("", port))
            return True
        except OSError:
            return False


def pick_domain_id() -> int:
    """A ROS domain for one run: 1..101, not used before by this process, its discovery port free now.

    Domains above 101 put Fast DDS's ports (``7400 + 250 * domain + ...``) inside Linux's
    ephemeral range (32768-60999), where any socket of any process may hold them (the ROS 2
    documentation's advice: 0-101). A domain is not reused within a process, so a late message
    of an earlier run can never reach a later one; the discovery multicast port is checked free,
    which also skips a domain another run on this machine is using.
    """
    candidates = [d for d in range(1, 102) if d not in _USED_DOMAINS]
    random.shuffle(candidates)
    for d in candidates:
        if _port_free(7400 + 250 * d):
            _USED_DOMAINS.add(d)
            return d
    raise RuntimeError("no free ROS domain in 1..101 (all used by this process or busy)")


def graph_env(tmp_path: Path, domain_id: int | None = None) -> dict:
    """Environment of a test's processes: its own domain (:func:`pick_domain_id`), log folder and large-data transport."""
    env = dict(os.environ)
    env["ROS_DOMAIN_ID"] = str(domain_id if domain_id is not None else pick_domain_id())
    env["ROS_LOG_DIR"] = str(tmp_path / "ros_log")
    env["FASTDDS_BUILTIN_TRANSPORTS"] = "LARGE_DATA"
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("HOME", str(tmp_path))
    return env


def start_node(env: dict, params: dict, log_path: Path, cwd: Path | None = None) -> subprocess.Popen:
    """Start the node (``python -m reg2d3d_ros.ros.node --ros-args -p name:=value ...``) as a process, its output in ``log_path``."""
    args = [sys.executable, "-m", "reg2d3d_ros.ros.node", "--ros-args"]
    for k, v in params.items():
        args += ["-p", f"{k}:={v}"]
    log = open(log_path, "w")
    return subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=cwd)


def dump_stacks_and_kill(proc: subprocess.Popen) -> None:
    """Ask a hung process of this project for its threads' stacks (SIGUSR1, see
    :func:`.lifecycle.enable_stack_dumps`; they go to its stderr), then kill it."""
    proc.send_signal(signal.SIGUSR1)
    time.sleep(1.0)
    proc.kill()


def run_tool(args: list, env: dict, timeout: float, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``subprocess.run(args, capture_output=True, text=True)``; past ``timeout`` the tool prints its
    threads' stacks (SIGUSR1, see :func:`.lifecycle.enable_stack_dumps`), is killed, and a
    ``TimeoutError`` carries its output."""
    proc = subprocess.Popen(args, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        dump_stacks_and_kill(proc)
        out, err = proc.communicate()
        raise TimeoutError(f"{' '.join(map(str, args[1:4]))} ... did not finish within {timeout:g} s; "
                           f"stdout:\n{out[-3000:]}\nstderr (with its stacks):\n{err[-8000:]}") from None
    except BaseException:  # Ctrl-C or SIGTERM of the caller: the tool does not outlive it
        proc.kill()
        proc.wait()
        raise
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> bool:
    """SIGINT; if the process has not exited after ``timeout`` s, dump its stacks (SIGUSR1) and kill it.

    Returns
    -------
    bool
        True if it exited on SIGINT.
    """
    if proc.poll() is not None:
        return True
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=timeout)
        return True
    except subprocess.TimeoutExpired:
        dump_stacks_and_kill(proc)
        proc.wait()
        return False


class GraphClient:
    """An rclpy participant in the domain of ``env`` (:func:`graph_env`), spinning in a background thread."""

    #: Name of the participant's node on the graph.
    NODE_NAME = "reg2d3d_graph_client"

    def __init__(self, env: dict):
        import rclpy
        from rclpy.context import Context
        from rclpy.executors import SingleThreadedExecutor

        os.environ["ROS_LOG_DIR"] = env["ROS_LOG_DIR"]
        # both ends of a large-data connection need the same builtin transports (read when the
        # participant is created)
        os.environ["FASTDDS_BUILTIN_TRANSPORTS"] = env["FASTDDS_BUILTIN_TRANSPORTS"]
        self.context = Context()
        rclpy.init(context=self.context, domain_id=int(env["ROS_DOMAIN_ID"]))
        self.node = rclpy.create_node(self.NODE_NAME, context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.lock = threading.Lock()
        self.received = {}
        #: callables whose text is added to a timeout's message (e.g. the tail of a node's log)
        self.explain = []
        self._stop = False
        self._thread = threading.Thread(target=self._spin, daemon=True)
        self._thread.start()

    def _spin(self):
        while not self._stop:
            self.executor.spin_once(timeout_sec=0.02)

    def subscribe(self, msg_type, topic: str, qos=None) -> list:
        """Collect ``(receive time, message)`` of a topic into a list (returned)."""
        from rclpy.qos import QoSProfile

        box = self.received.setdefault(topic, [])

        def cb(msg):
            with self.lock:
                box.append((time.monotonic(), msg))

        self.node.create_subscription(msg_type, topic, cb, qos or QoSProfile(depth=100))
        return box

    def publisher(self, msg_type, topic: str, qos=None, wait_subscribers: int = 1, timeout: float = 20.0):
        """A publisher, after its subscribers (the node) matched."""
        from rclpy.qos import QoSProfile

        pub = self.node.create_publisher(msg_type, topic, qos or QoSProfile(depth=10))
        deadline = time.monotonic() + timeout
        while pub.get_subscription_count() < wait_subscribers:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no subscriber matched {topic}")
            time.sleep(0.02)
        return pub

    def wait_for(self, predicate, timeout: float, what: str = "condition"):
        """Poll ``predicate()`` until true or time out (raises)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                value = predicate()
            if value:
                return value
            time.sleep(0.02)
        raise TimeoutError(f"timed out after {timeout} s waiting for {what}\n{self.describe()}")

    def describe(self) -> str:
        """What this participant sees of the graph, and the ``explain`` texts (for a failure message)."""
        lines = [f"domain {self.context.get_domain_id()}: nodes seen {sorted(self.node.get_node_names())}"]
        with self.lock:
            counts = {t: len(box) for t, box in self.received.items()}
        for topic, n in counts.items():
            lines.append(f"  {topic}: {self.node.count_publishers(topic)} publisher(s), {n} message(s) received")
        for fn in self.explain:
            try:
                lines.append(str(fn()))
            except Exception as e:  # a description must not hide the timeout
                lines.append(f"(explain failed: {e})")
        return "\n".join(lines)

    def close(self):
        import rclpy

        self._stop = True
        self._thread.join(timeout=2)
        self.executor.shutdown()
        self.node.destroy_node()
        rclpy.shutdown(context=self.context)


def last_diagnostics(received: list) -> dict:
    """Key/values of the newest registration status on /diagnostics ({} if none)."""
    for _, msg in reversed(received):
        for st in msg.status:
            if st.name.startswith("reg2d3d_ros"):
                d = {kv.key: kv.value for kv in st.values}
                d["_level"] = int.from_bytes(st.level, "little") if isinstance(st.level, bytes) else int(st.level)
                d["_message"] = st.message
                return d
    return {}


def pose_msg(T_optical_from_ct_mm, frame_id: str = "carm_optical"):
    """A ``geometry_msgs/PoseStamped`` (metres) of a ``(4, 4)`` pose in mm (stamp left at zero)."""
    import torch
    from geometry_msgs.msg import PoseStamped

    from ..geometry import transform_to_pose_m

    msg = PoseStamped()
    msg.header.frame_id = frame_id
    pos, quat = transform_to_pose_m(torch.as_tensor(T_optical_from_ct_mm, dtype=torch.float64))
    msg.pose.position.x, msg.pose.position.y, msg.pose.position.z = pos.tolist()
    o = msg.pose.orientation
    o.x, o.y, o.z, o.w = quat.tolist()
    return msg
