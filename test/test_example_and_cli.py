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
    res = run_cli(["reg2d3d_ros.ppcl.train", "--vertebrae", "T5", "--out", str(tmp_path / "m")], tmp_path)
    assert res.returncode == 2 and "at least two vertebrae" in res.stderr and "Traceback" not in res.stderr
    res = run_cli(["reg2d3d_ros.ppcflow.train", "--kinds", "magic", "--out", str(tmp_path / "m")], tmp_path)
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
    # the default sequence (randomised physics, C-arm sweep with breathing), short and small; lock-step
    # replay: every frame is processed, however loaded the machine (the real-time replay, where a
    # loaded node drops frames, is tested in test_node.py)
    res = run_cli(["reg2d3d_ros.demo", "--frames", "6", "--size", "128", "--lockstep", "--init", "ground-truth", "--vertebra", "T12",
                   "--view", "ap", "--out", str(out)], tmp_path)
    assert res.returncode == 0, res.stderr[-2000:] + res.stdout[-2000:]
    assert str(out) in res.stdout
    assert "initial pose = ground truth of frame 0" in res.stdout
    assert "[2/5, " in res.stdout and "[5/5, " in res.stdout  # the project's step lines
    assert "replayed" in res.stdout and "poses for 6 frames" in res.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["simulated"] is True and summary["frames_replayed"] == 6
    assert summary["physics"]["physics"].startswith("randomised") and summary["trajectory"] == "sweep"
    assert "lock-step on /registration/pose: 0 unanswered" in res.stdout
    assert summary["poses_published"] == summary["answered"] >= 4 and summary["tf_messages"] >= summary["poses_published"]
    # every frame is accounted for: answered, refused (processed, no pose), dropped or lost on the way
    assert summary["answered"] + summary["refused"] + summary["dropped"] + summary["not_received"] + summary["no_answer"] == 6
    assert summary["dropped"] == summary["no_answer"] == 0 and len(summary["status_per_frame"]) == 6  # lock-step: none dropped
    assert summary["mrpd_mm"]["median"] < 5.0  # registered (a loose bound: 128x128 frames, 2.4 mm pixels)
    assert (out / "error_per_frame.png").stat().st_size > 1000
    assert (out / "sequence_bag" / "metadata.yaml").is_file()
    assert "ready in" in (out / "node.log").read_text()
    # the animation: one picture per frame (answered, refused or dropped), beside the error plot
    from PIL import Image

    with Image.open(out / "animation.gif") as gif:
        assert gif.n_frames == 6 and gif.size[0] > gif.size[1]
    assert summary["animation"]["frames"] == 6 and (out / "overview.png").stat().st_size > 10000
    overlays = sorted((out / "overlays").iterdir())
    assert len(overlays) >= 3  # overlays go out best-effort (sensor QoS): one lost is no failure
    import cv2

    img = cv2.imread(str(overlays[0]))
    assert img.shape == (128, 128, 3)
    # the node draws the target's outline in green (OpenCV reads BGR)
    b, g, r = img[..., 0].astype(int), img[..., 1].astype(int), img[..., 2].astype(int)
    assert ((g > 180) & (r < 120) & (b < 120)).sum() > 10


def test_demo_marks_refused_and_dropped_frames(tmp_path):
    """The demo's pictures of frames without a pose say so (no ROS here: the drawing only)."""
    import torch
    from PIL import Image

    from reg2d3d_ros import demo
    from reg2d3d_ros.geometry.camera import CArmIntrinsics
    from reg2d3d_ros.sim.sequence import SimulatedSequence

    n = 4
    rng = np.random.default_rng(0)
    intr = CArmIntrinsics.from_detector(1020.0, 2.4, 64, 64)
    seq = SimulatedSequence(images=(rng.random((n, 64, 64)) * 60000).astype(np.uint16), encoding="mono16", intensity="attenuation",
                            poses_mm=np.tile(np.eye(4), (n, 1, 1)), intrinsics=intr, stamps_ns=np.arange(n) * 10**8)
    status = [demo.ANSWERED, demo.REFUSED, demo.DROPPED, demo.ANSWERED]
    refused = demo.frame_picture(seq, 1, demo.REFUSED, None)
    dropped = demo.frame_picture(seq, 2, demo.DROPPED, None)
    assert np.all(refused[0, :, 0] > 200) and np.all(refused[0, :, 1] < 100)  # red border: refused
    assert np.all(dropped[0, :, 0] == dropped[0, :, 1])  # grey border: dropped
    answered = np.array([0, 3])
    plot, x_to_px, rows = demo.error_plot(tmp_path / "plot.png", n, answered, np.array([0.5, 3.0]), np.linspace(0, 4, n), status, 2.0, "t")
    assert (tmp_path / "plot.png").is_file() and rows[0] < rows[1] and x_to_px(0) < x_to_px(3)
    pictures = [np.full((64, 64, 3), 128, np.uint8), refused, dropped, np.full((64, 64, 3), 128, np.uint8)]
    frames = list(demo.animation_frames(pictures, plot, x_to_px, rows, status))
    assert len(frames) == n and frames[0].shape[0] == plot.shape[0]
    assert demo.write_gif(tmp_path / "a.gif", frames, 6.0) == n
    with Image.open(tmp_path / "a.gif") as gif:
        gif.seek(1)
        left = np.asarray(gif.convert("RGB"))[:, : plot.shape[0]].astype(int)
    assert (left[..., 0] - left[..., 1] > 150).mean() > 0.02  # the refused frame's red border survives the palette


def test_bag_tools_report_user_errors(tmp_path):
    from rosbags.rosbag2 import Writer
    from rosbags.typesys import Stores, get_typestore

    res = run_cli(["reg2d3d_ros.ros.replay", str(tmp_path / "no_such_bag")], tmp_path)
    assert res.returncode == 2 and "does not exist" in res.stderr and "Traceback" not in res.stderr
    bag = tmp_path / "bag"
    with Writer(bag, version=9) as w:
        w.add_connection("/carm/image", "sensor_msgs/msg/Image", typestore=get_typestore(Stores.ROS2_KILTED))
    res = run_cli(["reg2d3d_ros.ros.replay", str(bag), "--lockstep", "/my/answer"], tmp_path)
    assert res.returncode == 2 and "type of topic /my/answer unknown" in res.stderr and "Traceback" not in res.stderr
    res = run_cli(["reg2d3d_ros.ros.replay", str(bag), "--lockstep-until-answer"], tmp_path)
    assert res.returncode == 2 and "--lockstep-until-answer needs --lockstep" in res.stderr and "Traceback" not in res.stderr
    res = run_cli(["reg2d3d_ros.ros.record", str(bag), "--topics", "/registration/pose"], tmp_path)
    assert res.returncode == 2 and "already exists" in res.stderr and "Traceback" not in res.stderr
