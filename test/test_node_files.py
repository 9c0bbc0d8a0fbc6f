"""Static checks of the ROS packaging: launch file, parameter file, package metadata.

`launch`/`launch_ros` cannot be installed here, so the launch file is checked by reading it: it
imports only `launch`/`launch_ros`, names an executable this package installs, and refers to
the config file the package installs. The config file mirrors the node's declared defaults.
The launch_testing test (test_launch_registration.py) runs wherever launch_testing exists.
"""

import ast
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def test_launch_file_imports_only_launch_and_names_real_executables():
    src = (REPO / "launch" / "registration.launch.py").read_text()
    tree = ast.parse(src)
    modules = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            modules.add(node.module.split(".")[0])
    assert modules <= {"launch", "launch_ros"}, modules
    assert any(isinstance(n, ast.FunctionDef) and n.name == "generate_launch_description" for n in tree.body)
    executables = set(re.findall(r'executable="([^"]+)"', src))
    setup = (REPO / "setup.py").read_text()
    console = set(re.findall(r'f"([a-z_0-9]+) = \{PACKAGE\}', setup))
    assert executables and executables <= console, (executables, console)
    for py_module in re.findall(r'f"[a-z_0-9]+ = \{PACKAGE\}\.([a-z_.]+):main"', setup):
        assert (REPO / "reg2d3d_ros" / (py_module.replace(".", "/") + ".py")).is_file(), py_module
    assert '"config", "registration.yaml"' in src and (REPO / "config" / "registration.yaml").is_file()
    assert 'package="reg2d3d_ros"' in src
    assert "FASTDDS_BUILTIN_TRANSPORTS" in src and "LARGE_DATA" in src


def test_config_mirrors_the_node_defaults():
    from reg2d3d_ros.ros.node import PARAMETERS

    doc = yaml.safe_load((REPO / "config" / "registration.yaml").read_text())
    params = doc["/**"]["ros__parameters"]
    declared = {name: default for name, default, *_ in PARAMETERS}
    assert params == declared


def test_package_xml_and_setup_agree():
    root = ET.parse(REPO / "package.xml").getroot()
    assert root.attrib["format"] == "3"
    assert root.findtext("name") == "reg2d3d_ros"
    assert root.find("export/build_type").text == "ament_python"
    deps = {e.text for e in root.findall("exec_depend")}
    assert {"rclpy", "sensor_msgs", "geometry_msgs", "tf2_msgs", "diagnostic_msgs", "std_srvs"} <= deps
    setup = (REPO / "setup.py").read_text()
    assert re.search(r'version="([^"]+)"', setup).group(1) == root.findtext("version")
    assert (REPO / "resource" / "reg2d3d_ros").is_file()


def test_every_parameter_has_a_descriptor_with_description():
    from reg2d3d_ros.ros.node import PARAMETERS, _descriptor

    for name, default, desc, unit, rng, ro in PARAMETERS:
        d = _descriptor(name, default, desc, unit, rng, ro)
        assert d.description and d.name == name and d.read_only == ro
        if isinstance(rng, tuple) and not isinstance(rng[0], str):
            assert d.floating_point_range or d.integer_range
        if name.endswith("_path") or name.endswith("_topic"):
            assert ro, f"{name} must be read-only"
