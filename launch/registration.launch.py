"""Start the registration node, optionally replaying a bag into it (full ROS 2 install).

    ros2 launch reg2d3d_ros registration.launch.py ct_path:=/data/ct.nii.gz \
        labels_path:=/data/labels.nii.gz target:=T8 [label_table_path:=/data/structures.csv | label_set:=totalseg_v1] \
        [resample_labels:=true] [bag:=/data/sequence_bag rate:=1.0] [params_file:=my_registration.yaml]

Defaults come from the package's config/registration.yaml. Fast DDS's LARGE_DATA builtin
transports are enabled for every process started here, so large images arrive complete.
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, ExecuteProcess, SetEnvironmentVariable
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution, PythonExpression
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare


def generate_launch_description():
    """Launch description: arguments, the node and an optional `ros2 bag play`."""
    default_params = PathJoinSubstitution([FindPackageShare("reg2d3d_ros"), "config", "registration.yaml"])
    args = [
        DeclareLaunchArgument("ct_path", description="CT volume (file or DICOM folder)"),
        DeclareLaunchArgument("labels_path", description="label map of the CT"),
        DeclareLaunchArgument("label_table_path", default_value="", description="CSV naming the labels (empty: TotalSegmentator's, built in)"),
        DeclareLaunchArgument("label_set", default_value="auto", description="built-in label ids: auto, totalseg_v2 or totalseg_v1"),
        DeclareLaunchArgument("resample_labels", default_value="false", description="resample a label map on another grid onto the CT's"),
        DeclareLaunchArgument("target", default_value="T8", description="structure to register (L3, vertebrae_L3 or a label id)"),
        DeclareLaunchArgument("intensity", default_value="attenuation", description="attenuation or transmission"),
        DeclareLaunchArgument("models_dir", default_value="", description="model folder of python -m reg2d3d_ros.prepare (SCR initialiser; checked at start-up)"),
        DeclareLaunchArgument("backend", default_value="auto", description="auto, tensorrt, onnxruntime or pytorch"),
        DeclareLaunchArgument("device", default_value="auto", description="auto, cpu or cuda"),
        DeclareLaunchArgument("params_file", default_value=default_params, description="parameter file"),
        DeclareLaunchArgument("bag", default_value="", description="rosbag2 to replay into the node (empty: none)"),
        DeclareLaunchArgument("rate", default_value="1.0", description="replay rate"),
    ]
    node = Node(
        package="reg2d3d_ros",
        executable="registration_node",
        name="registration_node",
        output="screen",
        parameters=[
            LaunchConfiguration("params_file"),
            {
                "ct_path": LaunchConfiguration("ct_path"),
                "labels_path": LaunchConfiguration("labels_path"),
                "label_table_path": LaunchConfiguration("label_table_path"),
                "label_set": LaunchConfiguration("label_set"),
                "resample_labels": LaunchConfiguration("resample_labels"),
                "target": LaunchConfiguration("target"),
                "intensity": LaunchConfiguration("intensity"),
                "models_dir": LaunchConfiguration("models_dir"),
                "backend": LaunchConfiguration("backend"),
                "device": LaunchConfiguration("device"),
            },
        ],
    )
    replay = ExecuteProcess(
        cmd=["ros2", "bag", "play", LaunchConfiguration("bag"), "--rate", LaunchConfiguration("rate")],
        output="screen",
        condition=IfCondition(PythonExpression(["'", LaunchConfiguration("bag"), "' != ''"])),
    )
    return LaunchDescription([SetEnvironmentVariable("FASTDDS_BUILTIN_TRANSPORTS", "LARGE_DATA"), *args, node, replay])
