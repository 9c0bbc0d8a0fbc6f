"""The ROS 2 layer: everything that imports rclpy or ROS messages lives here; the library does not.

- :mod:`.node`: the registration node (``python -m reg2d3d_ros.ros.node``, console script
  ``registration_node``), a thin layer over :class:`reg2d3d_ros.pipeline.RegistrationPipeline`;
- :mod:`.lifecycle`: start-up and shutdown of rclpy, signals, stack dumps, exit statuses;
- :mod:`.replay` / :mod:`.record`: rosbag2 replay onto the graph and recording
  (``python -m reg2d3d_ros.ros.replay``, ``python -m reg2d3d_ros.ros.record``; console scripts
  ``reg2d3d_replay``, ``reg2d3d_record``);
- :mod:`.client`: a client of the node on a real graph (own domain, the node as a process, a
  participant collecting its outputs); :mod:`.session`: a bag run through the node (the demo,
  ``trial``).
"""
