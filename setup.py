"""ament_python package definition of reg2d3d_ros (also pip-installable)."""

import os
from glob import glob

from setuptools import find_packages, setup

PACKAGE = "reg2d3d_ros"


def model_files():
    """``(share/PACKAGE/models/<sub>, files)`` for every folder under models/ (trained models)."""
    out = []
    for root, _, files in os.walk("models"):
        keep = [os.path.join(root, f) for f in sorted(files) if f != ".gitkeep"]
        if keep:
            out.append((f"share/{PACKAGE}/{root}", keep))
    return out


setup(
    name=PACKAGE,
    version="0.1.0",
    packages=find_packages(include=[PACKAGE, f"{PACKAGE}.*"]),
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        (f"share/{PACKAGE}/launch", glob("launch/*.launch.py")),
        (f"share/{PACKAGE}/config", glob("config/*.yaml")),
    ] + model_files(),
    install_requires=["setuptools"],
    zip_safe=True,
    maintainer="reg2d3d_ros maintainers",
    maintainer_email="maintainers@reg2d3d-ros.invalid",
    description="Real-time C-arm X-ray to CT 2-D/3-D registration as a ROS 2 node.",
    license="Apache-2.0",
    python_requires=">=3.10",
    entry_points={
        "console_scripts": [
            f"registration_node = {PACKAGE}.ros.node:main",
            f"reg2d3d_replay = {PACKAGE}.ros.replay:main",
            f"reg2d3d_record = {PACKAGE}.ros.record:main",
            f"reg2d3d_demo = {PACKAGE}.demo:main",
            f"reg2d3d_simulate = {PACKAGE}.sim.__main__:main",
            f"reg2d3d_example = {PACKAGE}.example:main",
            f"reg2d3d_prepare = {PACKAGE}.prepare:main",
        ],
    },
)
