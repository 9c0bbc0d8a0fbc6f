"""Geometry: SE(3) exp/log, quaternions, projection conventions, intrinsics, C-arm poses."""

import math

import pytest
import torch

from reg2d3d_ros.errors import ConfigError
from reg2d3d_ros.geometry import (
    CArmIntrinsics,
    backproject_pixels,
    carm_pose,
    invert_transform,
    matrix_from_quaternion,
    pose_m_to_transform,
    project_points,
    quaternion_from_matrix,
    scale_intrinsics,
    se3_exp,
    se3_log,
    so3_exp,
    so3_log,
    source_position_ct,
    transform_points,
    transform_to_pose_m,
)


def random_twists(n, dtype, max_angle=math.pi - 1e-3, seed=0):
    g = torch.Generator().manual_seed(seed)
    axis = torch.randn(n, 3, generator=g, dtype=torch.float64)
    axis = axis / axis.norm(dim=-1, keepdim=True)
    angle = torch.rand(n, 1, generator=g, dtype=torch.float64) * max_angle
    v = torch.randn(n, 3, generator=g, dtype=torch.float64) * 50.0
    return torch.cat([axis * angle, v], dim=-1).to(dtype)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 2e-3)])
def test_se3_exp_log_round_trip(dtype, tol):
    xi = random_twists(2000, dtype)
    xi[:5, :3] *= 1e-7  # tiny rotations take the Taylor branch
    back = se3_log(se3_exp(xi))
    assert back.dtype == dtype
    assert torch.allclose(back, xi, atol=tol, rtol=0)


def test_se3_exp_is_rigid_and_matches_rodrigues():
    xi = random_twists(100, torch.float64)
    T = se3_exp(xi)
    R = T[:, :3, :3]
    eye = torch.eye(3, dtype=torch.float64)
    assert torch.allclose(R @ R.transpose(-1, -2), eye.expand_as(R), atol=1e-12)
    assert torch.allclose(torch.linalg.det(R), torch.ones(100, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(R, so3_exp(xi[:, :3]), atol=1e-12)
    # a pure rotation by 90 deg about z maps x to y
    Rz = so3_exp(torch.tensor([0.0, 0.0, math.pi / 2], dtype=torch.float64))
    assert torch.allclose(Rz @ torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64), atol=1e-12)


def test_so3_log_near_pi():
    w = torch.tensor([[0.0, 0.0, math.pi - 1e-9], [math.pi - 1e-6, 0.0, 0.0]], dtype=torch.float64)
    R = so3_exp(w)
    assert torch.allclose(so3_exp(so3_log(R)), R, atol=1e-9)


def test_quaternion_round_trip_and_convention():
    xi = random_twists(500, torch.float64)
    R = se3_exp(xi)[:, :3, :3]
    q = quaternion_from_matrix(R)
    assert torch.all(q[:, 3] >= 0)
    assert torch.allclose(q.norm(dim=-1), torch.ones(500, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(matrix_from_quaternion(q), R, atol=1e-12)
    # ROS order (x, y, z, w): 90 deg about z is (0, 0, sin 45, cos 45)
    Rz = so3_exp(torch.tensor([0.0, 0.0, math.pi / 2], dtype=torch.float64))
    s = math.sqrt(0.5)
    assert torch.allclose(quaternion_from_matrix(Rz), torch.tensor([0.0, 0.0, s, s], dtype=torch.float64), atol=1e-12)


def test_invert_and_ros_pose_fields():
    T = se3_exp(random_twists(50, torch.float64))
    eye = torch.eye(4, dtype=torch.float64).expand(50, 4, 4)
    assert torch.allclose(invert_transform(T) @ T, eye, atol=1e-10)
    pos_m, q = transform_to_pose_m(T)
    assert torch.allclose(pos_m * 1000.0, T[:, :3, 3])
    assert torch.allclose(pose_m_to_transform(pos_m, q), T, atol=1e-10)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-3)])
def test_projection_back_projection_round_trip(dtype, tol):
    g = torch.Generator().manual_seed(1)
    intr = CArmIntrinsics.from_detector(1020.0, 0.6, 512, 480, cx=250.3, cy=241.7)
    K = intr.K(dtype)
    T = carm_pose([10.0, 20.0, -30.0], 700.0, lao_deg=25.0, cran_deg=-10.0, dtype=dtype)
    pts = (torch.randn(3, 400, 3, generator=g, dtype=torch.float64) * 40.0 + torch.tensor([10.0, 20.0, -30.0], dtype=torch.float64)).to(dtype)
    uv, depth = project_points(K, T, pts)
    assert uv.shape == (3, 400, 2) and depth.shape == (3, 400)
    p_opt = backproject_pixels(K, uv, depth)
    back = transform_points(invert_transform(T), p_opt)
    assert torch.allclose(back, pts, atol=tol * 100, rtol=0)


def test_projection_axes_follow_the_contract():
    intr = CArmIntrinsics.from_detector(1000.0, 1.0, 101, 81)
    K = intr.K()
    T = torch.eye(4, dtype=torch.float64)  # CT frame == optical frame
    pts = torch.tensor([[0.0, 0.0, 500.0], [10.0, 0.0, 500.0], [0.0, 10.0, 500.0]], dtype=torch.float64)
    uv, depth = project_points(K, T, pts)
    assert torch.allclose(uv[0], torch.tensor([50.0, 40.0], dtype=torch.float64))  # principal point = centre pixel
    assert uv[1, 0] > uv[0, 0] and uv[1, 1] == uv[0, 1]  # +x -> increasing column
    assert uv[2, 1] > uv[0, 1] and uv[2, 0] == uv[0, 0]  # +y -> increasing row
    assert torch.allclose(uv[1, 0] - uv[0, 0], torch.tensor(1000.0 / 500.0 * 10.0, dtype=torch.float64))  # fx = SDD/spacing
    assert torch.allclose(depth, torch.full((3,), 500.0, dtype=torch.float64))


def test_scaled_intrinsics_keep_pixel_centres():
    intr = CArmIntrinsics.from_detector(1020.0, 0.5, 512, 512, cx=200.0, cy=300.0)
    for s in (0.25, 0.5, 2.0):
        small = intr.scaled(s)
        assert (small.width, small.height) == (round(512 * s), round(512 * s))
        pts = torch.tensor([[5.0, -7.0, 800.0], [-40.0, 30.0, 760.0]], dtype=torch.float64)
        uv, _ = project_points(intr.K(), torch.eye(4, dtype=torch.float64), pts)
        uv_s, _ = project_points(small.K(), torch.eye(4, dtype=torch.float64), pts)
        assert torch.allclose(uv_s, s * (uv + 0.5) - 0.5, atol=1e-9)
        assert torch.allclose(scale_intrinsics(intr.K(), s), small.K(), atol=1e-9)
        assert small.sdd_mm == pytest.approx(intr.sdd_mm)


def test_camera_info_round_trip_and_validation():
    intr = CArmIntrinsics.from_detector(1020.0, 1.2, 256, 200)
    ci = intr.to_camera_info()
    assert ci["k"] == [850.0, 0.0, 127.5, 0.0, 850.0, 99.5, 0.0, 0.0, 1.0]
    assert len(ci["p"]) == 12 and ci["d"] == [0.0] * 5
    back = CArmIntrinsics.from_camera_info(ci["k"], ci["width"], ci["height"], pixel_spacing_mm=1.2)
    assert back == intr
    with pytest.raises(ConfigError):
        CArmIntrinsics.from_camera_info([1, 0.5, 0, 0, 1, 0, 0, 0, 1], 10, 10)
    with pytest.raises(ConfigError):
        CArmIntrinsics.from_detector(-1.0, 1.0, 10, 10)


def test_carm_pose_anatomy():
    iso = torch.tensor([5.0, 80.0, -160.0], dtype=torch.float64)
    intr = CArmIntrinsics.from_detector(1020.0, 1.2, 256, 256)
    K = intr.K()
    T_ap = carm_pose(iso, 700.0)
    src = source_position_ct(T_ap)
    assert torch.allclose(src, iso + torch.tensor([0.0, 700.0, 0.0], dtype=torch.float64))  # posterior source (LPS +y)
    uv, depth = project_points(K, T_ap, torch.stack([iso, iso + torch.tensor([0.0, 0.0, 20.0], dtype=torch.float64)]))
    assert torch.allclose(uv[0], torch.tensor([127.5, 127.5], dtype=torch.float64))  # isocentre on the principal ray
    assert depth[0] == pytest.approx(700.0)
    assert uv[1, 1] < uv[0, 1]  # superior is up in the image
    T_lao = carm_pose(iso, 700.0, lao_deg=90.0)
    assert torch.allclose(source_position_ct(T_lao), iso + torch.tensor([-700.0, 0.0, 0.0], dtype=torch.float64), atol=1e-9)  # source at the patient's right
    T_cran = carm_pose(iso, 700.0, cran_deg=20.0)
    assert source_position_ct(T_cran)[2] < iso[2]  # cranial: detector towards the head, source caudal
