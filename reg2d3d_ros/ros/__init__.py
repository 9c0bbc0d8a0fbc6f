"""The ROS 2 layer: bag replay and recording (the node is :mod:`reg2d3d_ros.registration_node`).

Everything that imports rclpy lives here or in the node; the library does not.
"""
