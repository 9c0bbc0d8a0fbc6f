"""Simulator: trajectories, image formation, foreign objects, bags and image encodings."""

import json
import math

import numpy as np
import pytest
import torch

from reg2d3d_ros.errors import ConfigError, ImageError
from reg2d3d_ros.eval import mtre
from reg2d3d_ros.geometry import CArmIntrinsics, carm_pose, invert_transform, se3_log, source_position_ct
from reg2d3d_ros.images import decode_image, encode_image, to_attenuation
from reg2d3d_ros.sim import Cylinder, XrayDegradation, degrade, project_cylinders, simulate_sequence
from reg2d3d_ros.sim import trajectory as traj
from reg2d3d_ros.sim.bag import GT_JSON, read_sequence_bag, write_sequence_bag
from reg2d3d_ros.drr import DRRRenderer

CENTER = np.array([10.0, 80.0, -160.0])


def target_points(n=300, seed=0):
    return torch.from_numpy(CENTER + np.random.default_rng(seed).normal(scale=15.0, size=(n, 3)))


def test_static_and_smooth_trajectories():
    T0 = carm_pose(CENTER, 680.0)
    st = traj.static(T0, 5)
    assert st.shape == (5, 4, 4) and torch.equal(st[3], T0)
    sm = traj.smooth_patient_motion(T0, 60, CENTER, fps=15.0, breathing_mm=2.0, drift_mm=3.0, drift_deg=2.0, seed=3)
    pts = target_points()
    assert torch.allclose(sm[0], T0, atol=1e-12)  # starts at T0
    err = mtre(sm, T0.expand_as(sm), pts)
    assert 0.5 < float(err.max()) < 12.0  # it moves, by a plausible amount
    step = mtre(sm[1:], sm[:-1], pts)
    assert float(step.max()) < 1.0  # smooth: under 1 mm between frames at 15 fps
    assert not torch.allclose(sm, traj.smooth_patient_motion(T0, 60, CENTER, seed=4))  # seed matters


def test_carm_rotation_and_jumps():
    rot = traj.carm_rotation(CENTER, 680.0, 11, 0.0, 10.0)
    src = source_position_ct(rot)
    assert torch.allclose((src - torch.from_numpy(CENTER)).norm(dim=-1), torch.full((11,), 680.0, dtype=torch.float64))
    rel = rot[-1] @ invert_transform(rot[0])
    assert math.degrees(float(se3_log(rel)[:3].norm())) == pytest.approx(10.0, abs=1e-6)
    T0 = carm_pose(CENTER, 680.0)
    j = traj.sudden_jumps(T0, 30, CENTER, jump_frames=(10, 20), jump_mm=8.0, jump_deg=4.0, jitter_mm=0.1, seed=1)
    step = mtre(j[1:], j[:-1], target_points())
    big = (step > 3.0).nonzero()[:, 0] + 1
    assert big.tolist() == [10, 20]  # the jumps happen where asked, nowhere else


def test_degradation_models():
    L = np.tile(np.linspace(0.0, 6.0, 64), (32, 1))
    clean = degrade(L, XrayDegradation.clean(encoding="32FC1"), np.random.default_rng(0))
    assert np.allclose(clean, L, atol=1e-5)  # attenuation display of a clean image is the line integral
    tr = degrade(L, XrayDegradation.clean(display="transmission", encoding="32FC1"), np.random.default_rng(0))
    assert np.allclose(tr, np.exp(-L), atol=1e-6)
    assert np.allclose(to_attenuation(tr * 1000.0, "transmission"), L, atol=1e-3)
    # quantum noise: variance of log counts ~ 1 / counts
    flat = np.full((200, 200), 2.0)
    noisy = degrade(flat, XrayDegradation(photons_per_pixel=1e4, scatter_fraction=0.0, blur_sigma_px=0.0, encoding="32FC1"), np.random.default_rng(1))
    expected_std = 1.0 / math.sqrt(1e4 * math.exp(-2.0))
    assert np.std(noisy) == pytest.approx(expected_std, rel=0.1)
    assert np.mean(noisy) == pytest.approx(2.0, abs=0.01)
    # blur reduces that noise; scatter lowers the contrast
    blurred = degrade(flat, XrayDegradation(photons_per_pixel=1e4, scatter_fraction=0.0, blur_sigma_px=1.0, encoding="32FC1"), np.random.default_rng(1))
    assert np.std(blurred) < 0.5 * np.std(noisy)
    sc = degrade(L, XrayDegradation(photons_per_pixel=None, scatter_fraction=0.2, blur_sigma_px=0.0, encoding="32FC1"), np.random.default_rng(0))
    assert (sc[:, -1] - sc[:, 0]).mean() < (L[:, -1] - L[:, 0]).mean()
    u16 = degrade(L, XrayDegradation(), np.random.default_rng(0))
    u8 = degrade(L, XrayDegradation(encoding="mono8"), np.random.default_rng(0))
    assert u16.dtype == np.uint16 and u8.dtype == np.uint8
    assert u16[:, -1].mean() > u16[:, 0].mean()  # attenuation display: more material is brighter
    with pytest.raises(ConfigError):
        XrayDegradation(encoding="rgb8")


def test_cylinder_chords_are_exact():
    intr = CArmIntrinsics.from_detector(1000.0, 0.5, 101, 101)
    T = torch.eye(4, dtype=torch.float64)  # CT frame = optical frame
    # a cylinder along x at depth 500, radius 2, length 40: the central ray crosses it through the axis
    cyl = Cylinder((-20.0, 0.0, 500.0), (20.0, 0.0, 500.0), 2.0, 1.0)
    img = project_cylinders([cyl], T, intr.K(), 101, 101)
    assert float(img[50, 50]) == pytest.approx(4.0, rel=1e-9)  # chord = diameter
    assert float(img[0, 0]) == 0.0
    # a cylinder along the principal ray: the central ray travels its whole length
    along = Cylinder((0.0, 0.0, 480.0), (0.0, 0.0, 520.0), 3.0, 0.5)
    img2 = project_cylinders([along], T, intr.K(), 101, 101)
    assert float(img2[50, 50]) == pytest.approx(0.5 * 40.0, rel=1e-6)


def tiny_renderer():
    n = 24
    k, j, i = np.meshgrid(*[np.arange(n)] * 3, indexing="ij")
    vol = (((i - 11.5) ** 2 + (j - 11.5) ** 2 + (k - 11.5) ** 2) < 64).astype(np.float32) * 0.03
    vol[:, :, :6] += 0.01  # asymmetric
    T = np.diag([2.0, 2.0, 2.0, 1.0])
    T[:3, 3] = CENTER - 11.5 * 2.0
    return DRRRenderer(torch.from_numpy(vol), T)


@pytest.mark.parametrize("storage,encoding", [("mcap", "mono16"), ("sqlite3", "32FC1"), ("mcap", "mono8")])
def test_bag_round_trip(tmp_path, storage, encoding):
    intr = CArmIntrinsics.from_detector(1020.0, 4.0, 48, 40)
    T0 = carm_pose(CENTER, 680.0, lao_deg=20.0)
    poses = traj.smooth_patient_motion(T0, 4, CENTER, seed=2)
    seq = simulate_sequence(tiny_renderer(), intr, poses, XrayDegradation(encoding=encoding), fps=10.0, seed=5)
    assert seq.images.shape == (4, 40, 48)
    path = write_sequence_bag(seq, tmp_path / "bag", storage=storage)
    assert (path / "metadata.yaml").is_file()
    back = read_sequence_bag(path)
    assert back.encoding == encoding and back.frame_id == "carm_optical"
    assert np.array_equal(back.images, seq.images)
    assert np.array_equal(back.stamps_ns, seq.stamps_ns)
    assert np.all(np.diff(back.stamps_ns) == 100_000_000)
    assert np.allclose(back.poses_mm, seq.poses_mm, atol=1e-9)
    assert back.intrinsics == intr
    doc = json.loads((path / GT_JSON).read_text())
    assert len(doc["frames"]) == 4 and doc["pose"] == "T_optical_from_ct"
    assert np.allclose(doc["frames"][2]["T_optical_from_ct_mm"], seq.poses_mm[2])
    assert np.allclose(np.asarray(doc["frames"][2]["position_m"]) * 1000.0, seq.poses_mm[2][:3, 3])
    with pytest.raises(ConfigError):
        write_sequence_bag(seq, path)  # no silent overwrite


def test_bag_messages_deserialize_into_real_ros_messages(tmp_path):
    """The bag's CDR bytes are what rclpy publishes: deserialize them into the real classes."""
    from rclpy.serialization import deserialize_message
    from rosbags.rosbag2 import Reader
    from geometry_msgs.msg import PoseStamped
    from sensor_msgs.msg import CameraInfo, Image

    intr = CArmIntrinsics.from_detector(1020.0, 4.0, 32, 32)
    seq = simulate_sequence(tiny_renderer(), intr, traj.static(carm_pose(CENTER, 680.0), 2), XrayDegradation(), seed=0)
    path = write_sequence_bag(seq, tmp_path / "bag")
    classes = {"sensor_msgs/msg/Image": Image, "sensor_msgs/msg/CameraInfo": CameraInfo, "geometry_msgs/msg/PoseStamped": PoseStamped}
    seen = set()
    with Reader(path) as reader:
        for conn, _, raw in reader.messages():
            msg = deserialize_message(bytes(raw), classes[conn.msgtype])
            seen.add(conn.topic)
            assert msg.header.frame_id == "carm_optical"
            if conn.topic == "/carm/image":
                arr = decode_image(msg.encoding, msg.height, msg.width, msg.step, bytes(msg.data), msg.is_bigendian)
                assert arr.shape == (32, 32)
            if conn.topic == "/carm/camera_info":
                assert list(msg.k) == intr.to_camera_info()["k"]
            if conn.topic == "/carm/ground_truth_pose":
                assert msg.pose.position.z == pytest.approx(seq.poses_mm[0][2, 3] / 1000.0)
    assert seen == {"/carm/image", "/carm/camera_info", "/carm/ground_truth_pose"}


def test_image_encoding_round_trip_and_errors():
    rng = np.random.default_rng(0)
    for enc, arr in [
        ("mono8", rng.integers(0, 255, (7, 9)).astype(np.uint8)),
        ("mono16", rng.integers(0, 65535, (7, 9)).astype(np.uint16)),
        ("32FC1", rng.normal(size=(7, 9)).astype(np.float32)),
    ]:
        f = encode_image(arr, enc)
        assert f["step"] == arr.shape[1] * arr.itemsize
        assert np.array_equal(decode_image(f["encoding"], f["height"], f["width"], f["step"], f["data"]), arr.astype(np.float32))
    # padded rows (step > width * size) and big-endian data
    arr = np.arange(12, dtype=np.uint16).reshape(3, 4) + 1
    padded = np.zeros((3, 6), dtype=">u2")
    padded[:, :4] = arr
    assert np.array_equal(decode_image("mono16", 3, 4, 12, padded.tobytes(), is_bigendian=1), arr)
    with pytest.raises(ImageError, match="unsupported image encoding 'rgb8'"):
        decode_image("rgb8", 2, 2, 6, bytes(12))
    with pytest.raises(ImageError, match="bytes"):
        decode_image("mono16", 4, 4, 8, bytes(10))
    with pytest.raises(ImageError, match="constant"):
        decode_image("mono8", 4, 4, 4, bytes(16))
    nan = np.full((2, 2), np.nan, np.float32)
    with pytest.raises(ImageError, match="NaN"):
        decode_image("32FC1", 2, 2, 8, nan.tobytes())
