"""The example CT (fetched by scripts/setup.sh) and the command-line entry points."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from reg2d3d_ros.errors import DataNotFoundError
from reg2d3d_ros.example import example_paths, load_example
from reg2d3d_ros.sim import structure_center


@pytest.fixture(scope="module")
def example_ct():
    return load_example()


def test_example_ct_is_in_the_physical_lps_frame(example_ct):
    ct = example_ct
    assert ct.hu.shape == (133, 512, 512)
    assert np.allclose(ct.spacing_mm, [0.703125, 0.703125, 2.5])
    direction = ct.T_ct_from_ijk[:3, :3] / ct.spacing_mm
    assert np.allclose(direction, np.diag([1.0, -1.0, 1.0]))  # SimpleITK's LPS direction, kept as is
    assert np.allclose(ct.ijk_to_ct(np.zeros((1, 3)))[0], [-166.0, 187.5968780517578, -340.0])
    assert ct.label_names["vertebrae_T8"] == 36
    # T8's centroid where TotalSegmentator put it (anterior of the origin, mid-thorax)
    assert np.allclose(structure_center(ct, "T8"), [0.3, 90.4, -163.9], atol=0.5)
    roi = ct.crop_to_labels([36], margin_mm=15.0)
    assert all(60 < e < 120 for e in np.asarray(roi.shape_ijk) * roi.spacing_mm)


def test_missing_example_gives_a_clear_error(tmp_path):
    with pytest.raises(DataNotFoundError, match="scripts/setup.sh"):
        example_paths(tmp_path)


def run_cli(args, tmp_path, timeout=600):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout, cwd=tmp_path, env=env)


def test_cli_reports_user_errors_without_traceback(tmp_path):
    res = run_cli(["reg2d3d_ros.sim", "--ct", str(tmp_path / "nope.nii.gz"), "--out", str(tmp_path / "bag")], tmp_path)
    assert res.returncode == 2
    assert "CT path does not exist" in res.stderr and "Traceback" not in res.stderr
    bad = tmp_path / "corrupt.nii.gz"
    bad.write_bytes(os.urandom(2048))
    res = run_cli(["reg2d3d_ros.sim", "--ct", str(bad), "--out", str(tmp_path / "bag")], tmp_path)
    assert res.returncode == 2
    assert "cannot read CT" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "bag").exists()  # nothing half-written


def test_training_and_evaluation_commands_report_user_errors(tmp_path):
    res = run_cli(["reg2d3d_ros.train_ppcl", "--vertebrae", "T5", "--out", str(tmp_path / "m")], tmp_path)
    assert res.returncode == 2 and "at least two vertebrae" in res.stderr and "Traceback" not in res.stderr
    res = run_cli(["reg2d3d_ros.train_ppcflow", "--kinds", "magic", "--out", str(tmp_path / "m")], tmp_path)
    assert res.returncode == 2 and "unknown kind 'magic'" in res.stderr and "Traceback" not in res.stderr
    res = run_cli(["reg2d3d_ros.eval.run_ppcl", "--model", str(tmp_path / "none.pt"), "--out", str(tmp_path / "r")], tmp_path)
    assert res.returncode == 2 and "does not exist" in res.stderr and "Traceback" not in res.stderr
    res = run_cli(["reg2d3d_ros.eval.run_intensity", "--variants", "sift", "--out", str(tmp_path / "r")], tmp_path)
    assert res.returncode == 2 and "variants must be among" in res.stderr and "Traceback" not in res.stderr
    res = run_cli(["reg2d3d_ros.export_models", str(tmp_path / "nothing_here")], tmp_path)
    assert res.returncode == 2 and "does not exist" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "m").exists() and not (tmp_path / "r").exists()


def test_demo_runs_end_to_end_through_the_node(tmp_path):
    out = tmp_path / "demo"
    # lock-step replay: every frame is answered, however loaded the machine (the real-time replay,
    # where a loaded node drops frames, is tested in test_node.py)
    res = run_cli(["reg2d3d_ros.demo", "--frames", "6", "--size", "128", "--lockstep", "--init", "ground-truth", "--vertebra", "T12",
                   "--view", "ap", "--out", str(out)], tmp_path)
    assert res.returncode == 0, res.stderr[-2000:] + res.stdout[-2000:]
    assert str(out) in res.stdout
    assert "initial pose = ground truth of frame 0" in res.stdout
    assert "replayed" in res.stdout and "poses for 6 frames" in res.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["simulated"] is True and summary["frames_replayed"] == 6
    assert "lock-step on /registration/pose: 0 unanswered" in res.stdout
    assert summary["poses_published"] == 6 and summary["tf_messages"] >= summary["poses_published"]
    assert summary["mrpd_mm"]["median"] < 5.0  # registered (a loose bound: 128x128 frames, 2.4 mm pixels)
    assert (out / "error_per_frame.png").stat().st_size > 1000
    assert (out / "sequence_bag" / "metadata.yaml").is_file()
    assert "ready in" in (out / "node.log").read_text()
    overlays = sorted((out / "overlays").iterdir())
    assert len(overlays) >= 3  # overlays go out best-effort (sensor QoS): one lost is no failure
    import cv2

    img = cv2.imread(str(overlays[0]))
    assert img.shape == (128, 128, 3)
    # the node draws the contour in green (OpenCV reads BGR)
    b, g, r = img[..., 0].astype(int), img[..., 1].astype(int), img[..., 2].astype(int)
    assert ((g > 180) & (r < 120) & (b < 120)).sum() > 10


def test_bag_tools_report_user_errors(tmp_path):
    from rosbags.rosbag2 import Writer
    from rosbags.typesys import Stores, get_typestore

    res = run_cli(["reg2d3d_ros.replay", str(tmp_path / "no_such_bag")], tmp_path)
    assert res.returncode == 2 and "does not exist" in res.stderr and "Traceback" not in res.stderr
    bag = tmp_path / "bag"
    with Writer(bag, version=9) as w:
        w.add_connection("/carm/image", "sensor_msgs/msg/Image", typestore=get_typestore(Stores.ROS2_KILTED))
    res = run_cli(["reg2d3d_ros.replay", str(bag), "--lockstep", "/my/answer"], tmp_path)
    assert res.returncode == 2 and "type of topic /my/answer unknown" in res.stderr and "Traceback" not in res.stderr
    res = run_cli(["reg2d3d_ros.record", str(bag), "--topics", "/registration/pose"], tmp_path)
    assert res.returncode == 2 and "already exists" in res.stderr and "Traceback" not in res.stderr
