"""Replay a rosbag2 bag (mcap or sqlite3) onto the ROS 2 graph, like ``ros2 bag play``.

Messages are published as recorded (their serialized CDR bytes, headers untouched) with the
real message classes' publishers, in recording order, at the recorded pace divided by
``--rate`` (``--rate 0``: as fast as possible). Topics can be selected and remapped.

Usage::

    python -m reg2d3d_ros.replay BAG [--rate 1.0] [--topics /carm/image /carm/camera_info]
                                    [--remap /carm/image:=/other/image] [--wait-subscribers 1]
                                    [--qos reliable|sensor] [--loop]
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
    return ap


def replay(args) -> int:
    """Publish the bag; returns the number of messages published."""
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
    stop_event = init_ros()
    node = rclpy.create_node("reg2d3d_replay")
    qos = qos_profile_sensor_data if args.qos == "sensor" else QoSProfile(depth=100)
    pubs = {}
    try:
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
                pubs[conn.topic].publish(bytes(raw))
                n += 1
            if not args.loop:
                break
        # give the middleware a moment to deliver the last messages
        time.sleep(0.2)
        return n
    finally:
        reader.close()
        shutdown_ros(node)


def main(argv=None) -> int:
    """Entry point."""
    from ..errors import run_cli
    from .lifecycle import exit_status

    args = build_parser().parse_args(argv)

    def body():
        n = replay(args)
        print(f"replayed {n} messages from {args.bag}")

    return exit_status(run_cli(body, "python -m reg2d3d_ros.replay"))


if __name__ == "__main__":
    sys.exit(main())
