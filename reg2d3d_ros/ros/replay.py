"""Replay a rosbag2 bag (mcap or sqlite3) onto the ROS 2 graph, like ``ros2 bag play``.

Messages are published as recorded (their serialized CDR bytes, headers untouched) with the
real message classes' publishers, in recording order, at the recorded pace divided by
``--rate`` (``--rate 0``: as fast as possible). Topics can be selected and remapped.

``--lockstep /registration/pose`` replays in lock-step instead: after each message of
``--lockstep-on`` (default ``/carm/image``) it waits until the node is done with it before going
on: a new message on the answer topic, or (for a frame that gets no pose: judged lost or
rejected) ``/diagnostics`` counting it (``frames_processed + frames_dropped`` reaching the
frames sent). Every frame is then processed, whatever the machine's speed: for evaluations and
demos that must not depend on load, where the real-time replay measures what a loaded node drops.

A frame counts as unanswered, and the replay goes on, when the node plainly will not answer it:
its ``/diagnostics`` still count fewer frames received after 5 s (the frame was lost on the
way), or the node has published no ``/diagnostics`` for 5 s (it stopped or hangs), or after
``--lockstep-timeout`` seconds (default 20) in any case. After ``--lockstep-max-unanswered``
consecutive unanswered frames (default 3) the replay stops with an error that says why
(exit status 2). The frames left unanswered are listed at the end.

``--lockstep-until-answer`` keeps the lock-step only until the first frame answered on the
answer topic (the node's first pose: its initialisation, which takes seconds) and replays the
rest at the recorded pace: what a C-arm user does (a first shot, then fluoroscopy), where the
node drops frames only when tracking cannot keep up.

Usage::

    python -m reg2d3d_ros.ros.replay BAG [--rate 1.0] [--topics /carm/image /carm/camera_info]
                                    [--remap /carm/image:=/other/image] [--wait-subscribers 1]
                                    [--qos reliable|sensor] [--loop]
                                    [--lockstep /registration/pose [--lockstep-timeout 20]
                                     [--lockstep-max-unanswered 3] [--lockstep-until-answer]]
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("FASTDDS_BUILTIN_TRANSPORTS", "LARGE_DATA")  # before the RMW is loaded


def message_class(msgtype: str):
    """The rclpy message class of a type name ``pkg/msg/Name``."""
    pkg, kind, name = msgtype.split("/")
    return getattr(importlib.import_module(f"{pkg}.{kind}"), name)


def build_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    ap = argparse.ArgumentParser(prog="python -m reg2d3d_ros.ros.replay", description=__doc__.split("\n\n")[0])
    ap.add_argument("bag", type=Path, help="rosbag2 folder (or .mcap / .db3 file)")
    ap.add_argument("--rate", type=float, default=1.0, help="playback rate (1 = real time, 0 = as fast as possible)")
    ap.add_argument("--topics", nargs="*", default=None, help="only these topics (default: all)")
    ap.add_argument("--exclude", nargs="*", default=(), help="skip these topics")
    ap.add_argument("--remap", nargs="*", default=(), help="FROM:=TO topic remappings")
    ap.add_argument("--qos", choices=["reliable", "sensor"], default="reliable", help="publisher QoS")
    ap.add_argument("--wait-subscribers", type=int, default=0, help="wait until this many subscribers match every topic")
    ap.add_argument("--wait-timeout", type=float, default=30.0, help="seconds to wait for subscribers")
    ap.add_argument("--start-delay", type=float, default=0.0, help="seconds to sleep before the first message")
    ap.add_argument("--loop", action="store_true")
    ap.add_argument("--lockstep", default=None, metavar="TOPIC[:=pkg/msg/Type]",
                    help="after each --lockstep-on message, wait for a message on this topic (default type: the node's outputs)")
    ap.add_argument("--lockstep-on", default="/carm/image", help="topic whose messages wait for an answer (default /carm/image)")
    ap.add_argument("--lockstep-timeout", type=float, default=20.0,
                    help="seconds to wait at most for each answer (sooner when the node did not receive the frame or went silent)")
    ap.add_argument("--lockstep-max-unanswered", type=int, default=3,
                    help="stop the replay (exit status 2) after this many consecutive unanswered frames; 0: never")
    ap.add_argument("--lockstep-until-answer", action="store_true",
                    help="lock-step only until the first answer on the --lockstep topic (e.g. the first pose), then at --rate")
    return ap


#: A node that has published no /diagnostics for this long (or five of its periods) is taken to be stopped or hung, s.
SILENT_S = 5.0
#: A frame that the node's /diagnostics do not count as received after this long was lost on the way, s.
RECEIVE_S = 5.0


class LockstepWatch:
    """What the node says about the frames sent to it, for ``--lockstep``: answers and its ``/diagnostics`` counts.

    Attributes
    ----------
    answers : int
        Messages received on the answer topic.
    done, received : int or None
        The node's ``frames_processed + frames_dropped`` and ``frames_received`` (highest seen), None before any.
    state, last_error : str
        The newest diagnostics' state and last error (for messages).
    """

    def __init__(self):
        self.answers = 0
        self.done = None
        self.received = None
        self.state = ""
        self.last_error = ""
        self._times = []  # receive times of the last diagnostics messages (monotonic)

    def on_answer(self, _raw) -> None:
        self.answers += 1

    def on_diagnostics(self, msg) -> None:
        for st in msg.status:
            kv = {v.key: v.value for v in st.values}
            if "frames_processed" not in kv:
                continue
            try:
                done = int(kv["frames_processed"]) + int(kv.get("frames_dropped", 0))
                received = int(kv["frames_received"]) if "frames_received" in kv else None
            except ValueError:
                continue
            self.done = max(done, self.done or 0)
            if received is not None:
                self.received = max(received, self.received or 0)
            self.state = kv.get("state", "")
            self.last_error = kv.get("last_error", "")
            self._times = (self._times + [time.monotonic()])[-6:]

    @property
    def last_diagnostics(self) -> float | None:
        """When the newest diagnostics message came (monotonic s), None before any."""
        return self._times[-1] if self._times else None

    def silent_limit(self) -> float:
        """How long without diagnostics means the node stopped: :data:`SILENT_S` or five of its periods."""
        gaps = [b - a for a, b in zip(self._times, self._times[1:])]
        return max(SILENT_S, 5.0 * sorted(gaps)[len(gaps) // 2]) if gaps else SILENT_S

    def describe(self) -> str:
        """The node's newest diagnostics in a few words."""
        if self.last_diagnostics is None:
            return "no /diagnostics from the node"
        return (f"its /diagnostics: state {self.state or '?'}, {self.received} frames received, {self.done} processed or dropped"
                + (f", last error {self.last_error!r}" if self.last_error else ""))


def wait_for_answer(watch: LockstepWatch, spin, answers_before: int, done_target: int | None, received_target: int | None,
                    timeout_s: float, stop_event) -> str:
    """Wait until the node is done with the frame just sent; returns '' or why it counts as unanswered.

    Parameters
    ----------
    watch : LockstepWatch
        Updated by ``spin``.
    spin : callable
        ``spin(timeout_s)``: handles the participant's callbacks for a moment.
    answers_before : int
        ``watch.answers`` before the frame was sent.
    done_target, received_target : int or None
        The node's ``frames_processed + frames_dropped`` and ``frames_received`` once it has
        the frame (None: the node publishes no diagnostics).
    timeout_s : float
        The longest wait.
    stop_event : threading.Event
        Set on Ctrl-C: stop waiting (the frame counts as answered: the caller stops).

    Returns
    -------
    str
        '' when the node answered (or on Ctrl-C); else why the frame counts as unanswered: it
        did not receive it (after :data:`RECEIVE_S`), it went silent (no diagnostics for
        :meth:`LockstepWatch.silent_limit`), or no answer within ``timeout_s``.
    """
    t0 = time.monotonic()
    while not stop_event.is_set():
        if watch.answers > answers_before or (done_target is not None and watch.done is not None and watch.done >= done_target):
            return ""
        now = time.monotonic()
        if now - t0 >= timeout_s:
            return f"no answer within {timeout_s:g} s"
        last = watch.last_diagnostics
        if last is not None:
            limit = watch.silent_limit()
            if now - last > limit and now - t0 > limit:
                return f"the node published no /diagnostics for {now - last:.0f} s (stopped or hung?)"
            if (received_target is not None and now - t0 > RECEIVE_S and last > t0 + 1.0 and watch.received is not None
                    and watch.received < received_target):
                return f"the node did not receive it (its /diagnostics count {watch.received} frames received, {received_target} expected)"
        spin(0.02)
    return ""


#: The node's outputs (``record``'s default topics) and their types.
NODE_OUTPUT_TYPES = {
    "/registration/pose": "geometry_msgs/msg/PoseStamped",
    "/tf": "tf2_msgs/msg/TFMessage",
    "/diagnostics": "diagnostic_msgs/msg/DiagnosticArray",
    "/registration/overlay": "sensor_msgs/msg/Image",
}

#: Every topic of the node's interface and its type: what ``--lockstep`` and ``record --topics``
#: know without ``:=pkg/msg/Type``.
TOPIC_TYPES = {
    **NODE_OUTPUT_TYPES,
    "/carm/image": "sensor_msgs/msg/Image",
    "/carm/camera_info": "sensor_msgs/msg/CameraInfo",
    "/carm/ground_truth_pose": "geometry_msgs/msg/PoseStamped",
    "/registration/initial_pose": "geometry_msgs/msg/PoseStamped",
}


def replay(args) -> tuple[int, int]:
    """Publish the bag; returns the number of messages published and of lock-step messages left unanswered."""
    import rclpy
    from rclpy.qos import QoSProfile, qos_profile_sensor_data
    from rosbags.rosbag2 import Reader

    from ..errors import Reg2D3DError
    from .lifecycle import init_ros, shutdown_ros

    remap = dict(r.split(":=", 1) for r in args.remap)
    if not args.bag.exists():
        raise Reg2D3DError(f"bag {args.bag} does not exist")
    try:
        reader = Reader(args.bag)
        reader.open()
    except Exception as exc:  # rosbags' own error types
        raise Reg2D3DError(f"cannot open bag {args.bag}: {exc}") from None
    answer_topic = answer_type = None
    if args.lockstep:
        answer_topic, _, answer_type = args.lockstep.partition(":=")
        answer_type = answer_type or TOPIC_TYPES.get(answer_topic)
        if not answer_type:
            reader.close()
            raise Reg2D3DError(f"type of topic {answer_topic} unknown: give it as --lockstep {answer_topic}:=pkg/msg/Type")
    elif getattr(args, "lockstep_until_answer", False):
        reader.close()
        raise Reg2D3DError("--lockstep-until-answer needs --lockstep TOPIC (the topic whose first message ends the lock-step)")
    stop_event = init_ros()
    node = rclpy.create_node("reg2d3d_replay")
    qos = qos_profile_sensor_data if args.qos == "sensor" else QoSProfile(depth=100)
    pubs = {}
    watch = LockstepWatch()
    unanswered = []  # (frame number, bag time in s, why)
    try:
        if answer_topic:
            node.create_subscription(message_class(answer_type), answer_topic, watch.on_answer, QoSProfile(depth=100), raw=True)
            node.create_subscription(message_class("diagnostic_msgs/msg/DiagnosticArray"), "/diagnostics", watch.on_diagnostics,
                                     QoSProfile(depth=100))
        conns = [c for c in reader.connections if (args.topics is None or c.topic in args.topics) and c.topic not in args.exclude]
        if not conns:
            raise Reg2D3DError(f"bag {args.bag} has none of the requested topics")
        for c in conns:
            if c.topic not in pubs:
                pubs[c.topic] = node.create_publisher(message_class(c.msgtype), remap.get(c.topic, c.topic), qos)
        if args.wait_subscribers > 0:
            deadline = time.monotonic() + args.wait_timeout
            while any(p.get_subscription_count() < args.wait_subscribers for p in pubs.values()):
                if time.monotonic() > deadline:
                    raise Reg2D3DError("timed out waiting for subscribers")
                rclpy.spin_once(node, timeout_sec=0.05)
        if answer_topic:  # the answer's publisher (the node) must be matched before the first message
            deadline = time.monotonic() + args.wait_timeout
            while node.count_publishers(answer_topic) < 1:
                if time.monotonic() > deadline:
                    raise Reg2D3DError(f"timed out waiting for a publisher of {answer_topic} (--lockstep)")
                rclpy.spin_once(node, timeout_sec=0.05)
            # and the node's frame count, if it publishes diagnostics (periodically)
            t_match = time.monotonic() + 3.0
            while time.monotonic() < t_match and watch.done is None:
                rclpy.spin_once(node, timeout_sec=0.05)
        baseline, rx_baseline = watch.done, watch.received
        to_send = sum(c.msgcount for c in conns if c.topic == args.lockstep_on)
        sent = 0
        consecutive = 0
        lost = 0  # frames the node never received: its counts stay that much below the frames sent
        locked = bool(answer_topic)  # False once --lockstep-until-answer saw its first answer
        time.sleep(args.start_delay)
        n = 0
        while True:
            t_bag0 = t_wall0 = None
            for conn, t_ns, raw in reader.messages(connections=conns):
                if stop_event.is_set():
                    raise KeyboardInterrupt
                if args.rate > 0:
                    if t_bag0 is None:
                        t_bag0, t_wall0 = t_ns, time.monotonic()
                    due = t_wall0 + (t_ns - t_bag0) / 1e9 / args.rate
                    delay = due - time.monotonic()
                    if delay > 0:
                        stop_event.wait(delay)
                before = watch.answers
                pubs[conn.topic].publish(bytes(raw))
                n += 1
                if conn.topic == args.lockstep_on and answer_topic and not locked:
                    sent += 1  # counted for the node's diagnostics totals, not waited for
                elif answer_topic and conn.topic == args.lockstep_on:
                    sent += 1
                    why = wait_for_answer(watch, lambda t: rclpy.spin_once(node, timeout_sec=t), before,
                                          None if baseline is None else baseline + sent - lost,
                                          None if rx_baseline is None else rx_baseline + sent - lost, args.lockstep_timeout, stop_event)
                    if stop_event.is_set():
                        raise KeyboardInterrupt
                    if why:
                        unanswered.append((sent, t_ns / 1e9, why))
                        consecutive += 1
                        lost += why.startswith("the node did not receive it")
                        print(f"warning: frame {sent} of {to_send} on {args.lockstep_on} (bag time {t_ns / 1e9:.3f} s) unanswered: {why}",
                              file=sys.stderr, flush=True)
                        if 0 < args.lockstep_max_unanswered <= consecutive:
                            raise Reg2D3DError(
                                f"lock-step: the node answered none of the last {consecutive} frames on {args.lockstep_on}, so the "
                                f"replay stopped after {sent} of {to_send} frames. Last: {why}; {watch.describe()}")
                    else:
                        consecutive = 0
                        if getattr(args, "lockstep_until_answer", False) and watch.answers > before:
                            locked = False
                    if t_bag0 is not None:  # the pace restarts after the answer
                        t_bag0, t_wall0 = t_ns, time.monotonic()
            if not args.loop:
                break
        # give the middleware a moment to deliver the last messages
        time.sleep(0.2)
        if unanswered:
            print(f"warning: {len(unanswered)} of {sent} frames on {args.lockstep_on} got no answer on {answer_topic}: "
                  f"{_frames_text(unanswered)}", file=sys.stderr)
        return n, len(unanswered)
    finally:
        reader.close()
        shutdown_ros(node)


def _frames_text(unanswered: list) -> str:
    """``frame 4 (bag time 12.345 s): why; ...`` of the unanswered frames (the first ten)."""
    text = "; ".join(f"frame {i} (bag time {t:.3f} s): {why}" for i, t, why in unanswered[:10])
    return text + (f"; and {len(unanswered) - 10} more" if len(unanswered) > 10 else "")


def main(argv=None) -> int:
    """Entry point."""
    from ..errors import run_cli
    from .lifecycle import enable_stack_dumps, exit_status

    enable_stack_dumps()
    args = build_parser().parse_args(argv)

    def body():
        n, unanswered = replay(args)
        until = " until its first answer, then at the recorded pace" if args.lockstep_until_answer else ""
        extra = f" (lock-step on {args.lockstep.partition(':=')[0]}{until}: {unanswered} unanswered)" if args.lockstep else ""
        print(f"replayed {n} messages from {args.bag}{extra}")

    return exit_status(run_cli(body, "python -m reg2d3d_ros.ros.replay"))


if __name__ == "__main__":
    sys.exit(main())
