"""launch_testing test of launch/registration.launch.py (runs wherever launch_testing exists).

`launch`, `launch_ros` and `launch_testing` are not installable from PyPI, so on this project's
CI machines this module is skipped at import (pytest.importorskip); on a full ROS 2 install
(`colcon test`, or `launch_test test/test_launch_registration.py`) it starts the node through the
package's launch file with the example CT, feeds it a simulated frame, and checks that a pose
comes back with the frame's header. The same behaviour is tested without launch on this
project's machines in test_node.py.
"""

import time
import unittest
from pathlib import Path

import pytest

launch_testing = pytest.importorskip("launch_testing")
launch = pytest.importorskip("launch")
launch_ros = pytest.importorskip("launch_ros")

import launch_testing.actions  # noqa: E402
from launch.launch_description_sources import PythonLaunchDescriptionSource  # noqa: E402


def _simulated_bag(tmp: Path):
    from reg2d3d_ros.eval.cases import CaseSet, make_cases
    from reg2d3d_ros.example import example_paths, load_example
    from reg2d3d_ros.sim import CArmSetup, XrayDegradation, make_trajectory, simulate_sequence, structure_center, xray_renderer
    from reg2d3d_ros.sim.bag import write_sequence_bag

    ct = load_example()
    setup = CArmSetup()
    T0 = make_cases(ct, CaseSet("t", ("T7",), views=("lateral",), seed=1001), 1)[0].T_gt
    poses = make_trajectory("static", T0, 2, structure_center(ct, "T7"), setup)
    seq = simulate_sequence(xray_renderer(ct), setup.intrinsics(), poses, XrayDegradation(), seed=1)
    return write_sequence_bag(seq, tmp / "bag", overwrite=True), example_paths()


@pytest.mark.launch_test
def generate_test_description():
    import tempfile

    tmp = Path(tempfile.mkdtemp())
    bag, ex = _simulated_bag(tmp)
    pkg_launch = Path(__file__).resolve().parents[1] / "launch" / "registration.launch.py"
    include = launch.actions.IncludeLaunchDescription(
        PythonLaunchDescriptionSource(str(pkg_launch)),
        launch_arguments={"ct_path": str(ex.ct), "labels_path": str(ex.labels), "label_table_path": str(ex.label_table), "target": "T7"}.items(),
    )
    return launch.LaunchDescription([include, launch_testing.actions.ReadyToTest()]), {"bag": bag}


class TestPosesThroughTheLaunchFile(unittest.TestCase):
    def test_pose_comes_back_with_the_frame_header(self, bag):
        import rclpy
        from geometry_msgs.msg import PoseStamped
        from rclpy.qos import qos_profile_sensor_data
        from rclpy.serialization import deserialize_message
        from rosbags.rosbag2 import Reader
        from sensor_msgs.msg import CameraInfo, Image

        rclpy.init()
        node = rclpy.create_node("launch_test_client")
        poses = []
        node.create_subscription(PoseStamped, "/registration/pose", poses.append, 10)
        pubs = {
            "/carm/image": node.create_publisher(Image, "/carm/image", qos_profile_sensor_data),
            "/carm/camera_info": node.create_publisher(CameraInfo, "/carm/camera_info", qos_profile_sensor_data),
            "/carm/ground_truth_pose": node.create_publisher(PoseStamped, "/registration/initial_pose", 10),
        }
        types = {"/carm/image": Image, "/carm/camera_info": CameraInfo, "/carm/ground_truth_pose": PoseStamped}
        deadline = time.monotonic() + 60
        while any(p.get_subscription_count() == 0 for p in pubs.values()) and time.monotonic() < deadline:
            rclpy.spin_once(node, timeout_sec=0.1)
        time.sleep(10.0)  # the node loads the CT
        with Reader(bag) as r:
            msgs = [(c.topic, deserialize_message(bytes(raw), types[c.topic])) for c, _, raw in r.messages()]
        first_image = None
        for topic, msg in msgs:  # camera_info, initial pose (ground truth of frame 0), then the frame
            if topic == "/carm/image":
                first_image = first_image or msg
                continue
            pubs[topic].publish(msg)
        time.sleep(0.5)
        pubs["/carm/image"].publish(first_image)
        deadline = time.monotonic() + 60
        while not poses and time.monotonic() < deadline:
            rclpy.spin_once(node, timeout_sec=0.1)
        node.destroy_node()
        rclpy.shutdown()
        self.assertTrue(poses, "no pose received")
        self.assertEqual(poses[0].header.stamp, first_image.header.stamp)
        self.assertEqual(poses[0].header.frame_id, first_image.header.frame_id)
