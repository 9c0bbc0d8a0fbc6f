"""Replay a rosbag2 bag (mcap or sqlite3) onto the ROS 2 graph, like ``ros2 bag play``.

Messages are published as recorded (their serialized CDR bytes, headers untouched) with the
real message classes' publishers, in recording order, at the recorded pace divided by
``--rate`` (``--rate 0``: as fast as possible). Topics can be selected and remapped.

``--lockstep /registration/pose`` replays in lock-step instead: after each message of
``--lockstep-on`` (default ``/carm/image``) it waits until the node is done with it before going
on: a new message on the answer topic, or (for a frame that gets no pose: judged lost or
rejected) ``/diagnostics`` counting it (``frames_processed + frames_dropped`` reaching the
frames sent), or ``--lockstep-timeout`` (the frame then counts as unanswered). Every frame is
then processed, whatever the machine's speed: for evaluations and demos that must not depend on
load, where the real-time replay measures what a loaded node drops.

Usage::

    python -m reg2d3d_ros.replay BAG [--rate 1.0] [--topics /carm/image /carm/camera_info]
                                    [--remap /carm/image:=/other/image] [--wait-subscribers 1]
                                    [--qos reliable|sensor] [--loop]
                                    [--lockstep /registration/pose [--lockstep-timeout 30]]
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
    ap = argparse.ArgumentParser(prog="python -m reg2d3d_ros.replay", description=__doc__.split("\n\n")[0])
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
    ap.add_argument("--lockstep-timeout", type=float, default=30.0, help="seconds to wait for each answer")
    return ap


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
    stop_event = init_ros()
    node = rclpy.create_node("reg2d3d_replay")
    qos = qos_profile_sensor_data if args.qos == "sensor" else QoSProfile(depth=100)
    pubs = {}
    answers = [0]
    progress = [None]  # the node's frames_processed + frames_dropped, from /diagnostics
    unanswered = 0
    try:
        if answer_topic:
            def on_answer(_raw):
                answers[0] += 1

            def on_diagnostics(msg):
                for st in msg.status:
                    kv = {v.key: v.value for v in st.values}
                    if "frames_processed" in kv:
                        try:
                            done = int(kv["frames_processed"]) + int(kv.get("frames_dropped", 0))
                        except ValueError:
                            continue
                        progress[0] = max(done, progress[0] or 0)

            node.create_subscription(message_class(answer_type), answer_topic, on_answer, QoSProfile(depth=100), raw=True)
            node.create_subscription(message_class("diagnostic_msgs/msg/DiagnosticArray"), "/diagnostics", on_diagnostics, QoSProfile(depth=100))
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
            while time.monotonic() < t_match and progress[0] is None:
                rclpy.spin_once(node, timeout_sec=0.05)
        baseline = progress[0]
        sent = 0
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
                before = answers[0]
                pubs[conn.topic].publish(bytes(raw))
                n += 1
                if answer_topic and conn.topic == args.lockstep_on:
                    sent += 1
                    deadline = time.monotonic() + args.lockstep_timeout

                    def done():
                        return answers[0] > before or (baseline is not None and progress[0] >= baseline + sent)

                    while not done() and time.monotonic() < deadline and not stop_event.is_set():
                        rclpy.spin_once(node, timeout_sec=0.02)
                    if not done():
                        unanswered += 1
                    if t_bag0 is not None:  # the pace restarts after the answer
                        t_bag0, t_wall0 = t_ns, time.monotonic()
            if not args.loop:
                break
        # give the middleware a moment to deliver the last messages
        time.sleep(0.2)
        if unanswered:
            print(f"warning: {unanswered} message(s) on {args.lockstep_on} got no answer on {answer_topic} "
                  f"within {args.lockstep_timeout:g} s", file=sys.stderr)
        return n, unanswered
    finally:
        reader.close()
        shutdown_ros(node)


def main(argv=None) -> int:
    """Entry point."""
    from ..errors import run_cli
    from .lifecycle import enable_stack_dumps, exit_status

    enable_stack_dumps()
    args = build_parser().parse_args(argv)

    def body():
        n, unanswered = replay(args)
        extra = f" (lock-step on {args.lockstep.partition(':=')[0]}: {unanswered} unanswered)" if args.lockstep else ""
        print(f"replayed {n} messages from {args.bag}{extra}")

    return exit_status(run_cli(body, "python -m reg2d3d_ros.replay"))


if __name__ == "__main__":
    sys.exit(main())
