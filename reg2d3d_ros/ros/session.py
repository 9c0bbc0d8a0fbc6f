"""Drive the registration node with a bag: start it, give it an initial pose, replay, collect.

Used by the demo (README command 1) and ``trial``. The node runs as its own process, started
through its public entry point (``python -m reg2d3d_ros.ros.node``, :func:`.client.start_node`), and
the bag is replayed by ``python -m reg2d3d_ros.ros.replay``. Imports rclpy: this is the ROS layer,
not the library.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from ..errors import Reg2D3DError
from .client import GraphClient, graph_env, last_diagnostics, pose_msg, run_tool, start_node, stop_process


def run_bag_through_node(bag: Path, params: dict, T_initial_mm, out: Path, rate: float = 1.0, n_frames: int = 0,
                         log=print, ready_timeout_s: float = 120.0, lockstep: bool = False, lockstep_until_answer: bool = False) -> dict:
    """Start the node, publish an initial pose (or let it initialise itself), replay ``bag`` into it and collect its outputs.

    Parameters
    ----------
    bag : Path
        rosbag2 with ``/carm/image`` and ``/carm/camera_info`` (``/carm/ground_truth_pose`` is not replayed).
    params : dict
        Node parameters (``ct_path``, ``labels_path``, ...).
    T_initial_mm : torch.Tensor or None
        ``(4, 4)`` float64 ``T_optical_from_ct`` in mm, published on ``/registration/initial_pose``;
        None: publish nothing (the node initialises with its SCR model, ``models_dir``).
    out : Path
        Folder for ``node.log`` and the ROS log folder (``out/ros_log``, of every process this
        starts; the replay runs in ``out``): nothing is written elsewhere.
    rate : float
        Replay rate (1 = recorded pace).
    n_frames : int
        Frames in the bag (to wait for the node to finish the last ones).
    lockstep : bool
        Replay each frame only after the node's pose of the previous one (every frame answered,
        whatever the machine's load); False: at ``rate``, the node dropping what it cannot keep up with.
    lockstep_until_answer : bool
        With ``lockstep``: only until the node's first pose (its initialisation), then at ``rate``.

    Returns
    -------
    dict
        ``poses`` (PoseStamped list), ``tf_messages`` (count), ``overlays`` (Image list),
        ``diagnostics`` (the last key/values), ``replay_output`` (the replay tool's line).
    """
    from diagnostic_msgs.msg import DiagnosticArray
    from geometry_msgs.msg import PoseStamped
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import Image
    from tf2_msgs.msg import TFMessage

    out, bag = Path(out).resolve(), Path(bag).resolve()  # a relative folder would put the node's ROS logs elsewhere (it runs in the repository)
    log("[3/5] starting the registration node (its log: node.log)")
    env = graph_env(out, None)
    proc = start_node(env, {**params, "diagnostics_period": 0.5}, out / "node.log", cwd=out)
    g = None
    try:
        g = GraphClient(env)
        poses_rx = g.subscribe(PoseStamped, "/registration/pose")
        tf_rx = g.subscribe(TFMessage, "/tf")
        diag_rx = g.subscribe(DiagnosticArray, "/diagnostics")
        overlay_rx = g.subscribe(Image, "/registration/overlay", qos_profile_sensor_data)

        def state():
            with g.lock:
                return last_diagnostics(diag_rx)

        deadline = time.monotonic() + ready_timeout_s
        while state().get("state") != "initialising":
            d = state()
            if proc.poll() is not None or time.monotonic() > deadline or (d.get("state") == "waiting_for_ct" and d.get("last_error")):
                raise Reg2D3DError(f"the node did not get ready: {d.get('last_error') or 'see ' + str(out / 'node.log')}")
            time.sleep(0.1)
        log("      node ready (CT loaded, target prepared)")

        if T_initial_mm is not None:
            log("[4/5] initial pose = ground truth of frame 0; replaying the bag")
            init = g.publisher(PoseStamped, "/registration/initial_pose")
            init.publish(pose_msg(T_initial_mm))
            time.sleep(0.5)
        else:
            log("[4/5] no initial pose: the node initialises itself (SCR-PnP, then PPC); replaying the bag")
        try:
            res = run_tool(
                [sys.executable, "-m", "reg2d3d_ros.ros.replay", str(bag), "--rate", str(rate), "--qos", "sensor",
                 "--exclude", "/carm/ground_truth_pose", "--wait-subscribers", "1"]
                # an initialisation (SCR, in-plane search, PPC, polish) takes 10-30 s on 2 free cores, minutes on loaded ones
                + (["--lockstep", "/registration/pose", "--lockstep-timeout", "180"] if lockstep else [])
                + (["--lockstep-until-answer"] if lockstep and lockstep_until_answer else []),
                env, timeout=600 + (30 * n_frames if lockstep else 0), cwd=out,
            )
        except TimeoutError as exc:
            raise Reg2D3DError(f"the replay did not finish: {exc}") from None
        if res.returncode != 0:
            raise Reg2D3DError(f"replay failed: {res.stderr.strip()}")
        log(f"      {res.stdout.strip()}")
        t_wait = time.monotonic() + 10
        while time.monotonic() < t_wait:  # the frame in progress finishes
            time.sleep(0.5)
            d = state()
            if d.get("frames_processed") and int(d["frames_processed"]) + int(d["frames_dropped"]) >= n_frames:
                break
        time.sleep(1.0)
        with g.lock:
            return {"poses": [p for _, p in poses_rx], "tf_messages": len(tf_rx), "overlays": [m for _, m in overlay_rx],
                    "diagnostics": last_diagnostics(diag_rx), "replay_output": res.stdout.strip()}
    finally:
        if g is not None:
            g.close()
        stop_process(proc)
