"""ament_python package definition of reg2d3d_ros (also pip-installable)."""

from glob import glob

from setuptools import find_packages, setup

PACKAGE = "reg2d3d_ros"

setup(
    name=PACKAGE,
    version="0.1.0",
    packages=find_packages(include=[PACKAGE, f"{PACKAGE}.*"]),
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        (f"share/{PACKAGE}/launch", glob("launch/*.launch.py")),
        (f"share/{PACKAGE}/config", glob("config/*.yaml")),
        (f"share/{PACKAGE}/models", [f for f in glob("models/*") if not f.endswith(".gitkeep")]),
    ],
    install_requires=["setuptools"],
    zip_safe=True,
    maintainer="reg2d3d_ros maintainers",
    maintainer_email="maintainers@reg2d3d-ros.invalid",
    description="Real-time C-arm X-ray to CT 2-D/3-D registration as a ROS 2 node.",
    license="Apache-2.0",
    python_requires=">=3.10",
    entry_points={
        "console_scripts": [
            f"registration_node = {PACKAGE}.registration_node:main",
            f"reg2d3d_replay = {PACKAGE}.ros.replay:main",
            f"reg2d3d_record = {PACKAGE}.ros.record:main",
            f"reg2d3d_demo = {PACKAGE}.demo:main",
            f"reg2d3d_simulate = {PACKAGE}.sim.__main__:main",
            f"reg2d3d_example = {PACKAGE}.example:main",
        ],
    },
)
