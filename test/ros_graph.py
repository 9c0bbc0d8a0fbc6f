"""Test-side access to the graph helpers (they live in :mod:`reg2d3d_ros.ros.graph`)."""

from reg2d3d_ros.ros.graph import REPO, TestGraph, dump_stacks_and_kill, graph_env, image_msg, last_diagnostics, pose_msg, process_report, run_tool, sequence_frame_msg, start_node, stop_process  # noqa: F401
