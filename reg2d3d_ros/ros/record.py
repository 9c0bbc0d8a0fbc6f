"""Record topics of the ROS 2 graph into a rosbag2 bag (mcap or sqlite3), like ``ros2 bag record``.

Messages are stored as received (serialized CDR, received with raw subscriptions) with the
receive time as the bag timestamp; the message definitions come from the ``rosbags`` ROS 2
Kilted typestore. Recording stops after ``--duration`` seconds, ``--messages`` messages, or
on Ctrl-C.

Usage::

    python -m reg2d3d_ros.ros.record OUT_BAG [--topics /registration/pose /tf /diagnostics]
                                        [--duration 30] [--storage mcap|sqlite3]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("FASTDDS_BUILTIN_TRANSPORTS", "LARGE_DATA")  # before the RMW is loaded



def build_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    ap = argparse.ArgumentParser(prog="python -m reg2d3d_ros.ros.record", description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="bag folder to create")
    ap.add_argument("--topics", nargs="*", default=None, help="TOPIC or TOPIC:=pkg/msg/Type (default: the node's outputs)")
    ap.add_argument("--duration", type=float, default=0.0, help="stop after this many seconds (0: until Ctrl-C)")
    ap.add_argument("--messages", type=int, default=0, help="stop after this many messages (0: no limit)")
    ap.add_argument("--storage", choices=["mcap", "sqlite3"], default="mcap")
    ap.add_argument("--qos", choices=["reliable", "sensor"], default="reliable", help="subscription QoS")
    return ap


def record(args) -> int:
    """Record until a stop condition; returns the number of messages written."""
    import rclpy
    from rclpy.qos import QoSProfile, qos_profile_sensor_data
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore

    from ..errors import Reg2D3DError
    from .lifecycle import init_ros, shutdown_ros
    from .replay import NODE_OUTPUT_TYPES, TOPIC_TYPES, message_class

    topics = dict(NODE_OUTPUT_TYPES)
    if args.topics:
        topics = {}
        for t in args.topics:
            name, _, msgtype = t.partition(":=")
            msgtype = msgtype or TOPIC_TYPES.get(name)
            if not msgtype:
                raise Reg2D3DError(f"type of topic {name} unknown: give it as {name}:=pkg/msg/Type")
            topics[name] = msgtype
    if args.out.exists():
        raise Reg2D3DError(f"{args.out} already exists")
    ts = get_typestore(Stores.ROS2_KILTED)
    plugin = StoragePlugin.MCAP if args.storage == "mcap" else StoragePlugin.SQLITE3
    stop_event = init_ros()
    node = rclpy.create_node("reg2d3d_record")
    qos = qos_profile_sensor_data if args.qos == "sensor" else QoSProfile(depth=100)
    count = [0]
    stop = [False]
    with Writer(args.out, version=9, storage_plugin=plugin) as writer:
        conns = {name: writer.add_connection(name, mt, typestore=ts) for name, mt in topics.items()}

        def make_cb(name):
            def cb(raw: bytes):
                writer.write(conns[name], time.time_ns(), raw)
                count[0] += 1
                if args.messages and count[0] >= args.messages:
                    stop[0] = True
            return cb

        subs = [node.create_subscription(message_class(mt), name, make_cb(name), qos, raw=True) for name, mt in topics.items()]
        print(f"recording {len(topics)} topic(s) to {args.out}", flush=True)
        matched = False
        t_end = time.monotonic() + args.duration if args.duration > 0 else None
        try:
            while not stop[0] and not stop_event.is_set() and (t_end is None or time.monotonic() < t_end):
                rclpy.spin_once(node, timeout_sec=0.1)
                if not matched and all(s.get_publisher_count() > 0 for s in subs):
                    matched = True  # every topic has a publisher connected: from now on nothing is missed
                    print("all topics matched to a publisher", flush=True)
        except BaseException:
            shutdown_ros(node)
            raise
    # the bag is closed (no callback runs without spinning); now the middleware
    shutdown_ros(node)
    return count[0]


def main(argv=None) -> int:
    """Entry point."""
    from ..errors import run_cli
    from .lifecycle import enable_stack_dumps, exit_status

    enable_stack_dumps()
    args = build_parser().parse_args(argv)

    def body():
        n = record(args)
        print(f"recorded {n} messages to {args.out}")

    return exit_status(run_cli(body, "python -m reg2d3d_ros.ros.record"))


if __name__ == "__main__":
    sys.exit(main())
