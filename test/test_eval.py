"""Metrics on hand-computed cases, capture range, and the start-position generator."""

import math

import numpy as np
import pytest
import torch

from reg2d3d_ros.eval import capture_range, mrpd, mtre, projection_error_px, random_starts, summarize
from reg2d3d_ros.geometry import CArmIntrinsics, carm_pose, se3_exp, se3_log, invert_transform


def test_identity_and_pure_translation():
    T = carm_pose([0.0, 0.0, 0.0], 700.0, lao_deg=30.0)
    pts = torch.randn(50, 3, dtype=torch.float64) * 20
    assert float(mtre(T, T, pts)) == 0.0 and float(mrpd(T, T, pts)) == pytest.approx(0.0, abs=1e-9)
    shift = torch.eye(4, dtype=torch.float64)
    shift[:3, 3] = torch.tensor([3.0, -4.0, 12.0])
    assert float(mtre(shift @ T, T, pts)) == pytest.approx(13.0)


def test_pure_depth_error_costs_no_reprojection_distance():
    # points on the principal ray moved along it: mTRE = offset, mRPD = 0
    T = torch.eye(4, dtype=torch.float64)
    pts = torch.tensor([[0.0, 0.0, 650.0], [0.0, 0.0, 700.0], [0.0, 0.0, 720.0]], dtype=torch.float64)
    depth = torch.eye(4, dtype=torch.float64)
    depth[2, 3] = 15.0
    assert float(mtre(depth @ T, T, pts)) == pytest.approx(15.0)
    assert float(mrpd(depth @ T, T, pts)) == pytest.approx(0.0, abs=1e-12)
    # off-axis points: the error is only the small magnification change
    off = torch.tensor([[10.0, 0.0, 700.0]], dtype=torch.float64)
    # ray through (10, 0, 715); distance of (10, 0, 700) to it = 700 * 10 / 715 * ... exactly:
    u = torch.tensor([10.0, 0.0, 715.0], dtype=torch.float64)
    u = u / u.norm()
    p = off[0]
    expected = float((p - (p @ u) * u).norm())
    assert float(mrpd(depth @ T, T, off)) == pytest.approx(expected, rel=1e-12)
    assert expected < 0.25


def test_in_plane_error_hand_computed():
    T = torch.eye(4, dtype=torch.float64)
    z, d = 700.0, 5.0
    pts = torch.tensor([[0.0, 0.0, z]], dtype=torch.float64)
    move = torch.eye(4, dtype=torch.float64)
    move[0, 3] = d
    # the estimated ray passes through (d, 0, z); distance of (0, 0, z) to it is z d / sqrt(z^2 + d^2)
    assert float(mrpd(move @ T, T, pts)) == pytest.approx(z * d / math.sqrt(z * z + d * d), rel=1e-12)
    intr = CArmIntrinsics.from_detector(1000.0, 1.0, 100, 100)
    assert float(projection_error_px(move @ T, T, pts, intr.K())) == pytest.approx(1000.0 / z * d, rel=1e-12)


def test_capture_range_and_summary():
    init = np.array([0.5, 0.7, 1.5, 1.6, 2.5, 2.6, 3.5, 3.6, 4.5])
    ok = np.array([1, 1, 1, 1, 1, 0, 1, 1, 0], dtype=bool)
    assert capture_range(init, ok, bin_mm=1.0) == 2.0  # bin [2, 3) has 50 % success
    assert capture_range(init, np.ones(9, bool), bin_mm=1.0) == 5.0
    assert capture_range(init, ~np.ones(9, bool), bin_mm=1.0) == 0.0
    final = np.array([0.5, 0.7, 1.0, 1.2, 0.9, 5.0, 1.1, 1.3, 12.0])
    s = summarize(init, final, iterations=np.full(9, 4), seconds=np.full(9, 0.1))
    assert s["n"] == 9
    assert s["sr_percent"] == pytest.approx(100 * 7 / 9)
    assert s["gsr_percent"] == pytest.approx(100 * 8 / 9)
    assert s["mrpd_mean_mm"] == pytest.approx(np.mean([0.5, 0.7, 1.0, 1.2, 0.9, 1.1, 1.3]))
    assert s["cr_mm"] == 2.0 and s["gcr_mm"] == 4.0
    assert s["iterations_mean"] == 4.0


def test_random_starts_have_prescribed_spread_of_initial_error():
    T = carm_pose([5.0, 80.0, -160.0], 680.0, lao_deg=10.0)
    pts = torch.from_numpy(np.random.default_rng(0).normal(scale=15.0, size=(300, 3)) + [5.0, 80.0, -160.0])
    starts, err = random_starts(T, pts, 200, max_mtre_mm=30.0, seed=7, max_rotation_deg=30.0)
    assert starts.shape == (200, 4, 4)
    assert torch.allclose(err, mtre(starts, T.expand_as(starts), pts))
    counts = np.histogram(err.numpy(), bins=10, range=(0, 30))[0]
    assert counts.tolist() == [20] * 10  # stratified: evenly spread over 0-30 mm
    rel = starts @ invert_transform(T)
    angles = torch.rad2deg(se3_log(rel)[:, :3].norm(dim=-1))
    assert float(angles.max()) <= 30.0 + 1e-6 and float(angles.max()) > 5.0  # rotations are part of it
    again, _ = random_starts(T, pts, 200, max_mtre_mm=30.0, seed=7, max_rotation_deg=30.0)
    assert torch.equal(again, starts)  # seeded
    R = starts[:, :3, :3]
    assert torch.allclose(R @ R.transpose(-1, -2), torch.eye(3, dtype=torch.float64).expand_as(R), atol=1e-10)
    assert se3_exp is not None


def test_seed_like_starts_follow_the_seed_protocol():
    """Starts for the intensity evaluation: truncated Gaussians about the target's centre, inside the field of view."""
    import math

    from reg2d3d_ros.eval.run_intensity import seed_like_starts
    from reg2d3d_ros.geometry import CArmIntrinsics, so3_log, transform_points
    from reg2d3d_ros.sim import CArmSetup

    intr = CArmSetup().intrinsics()
    assert isinstance(intr, CArmIntrinsics)
    T_gt = torch.eye(4, dtype=torch.float64)
    T_gt[2, 3] = 680.0
    pts = torch.randn(200, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 15.0
    starts = seed_like_starts(T_gt, pts, intr, 60, seed=1)
    assert starts.shape == (60, 4, 4)
    rel = starts @ torch.linalg.inv(T_gt)
    ang = torch.stack([so3_log(r[:3, :3]) for r in rel]).abs().max(dim=1).values
    assert float(ang.max()) <= math.radians(40.0) * 1.001 + 1e-9 and float(ang.max()) > math.radians(10.0)
    c = transform_points(starts, pts.mean(0)[None].expand(60, 1, 3))[:, 0]
    d = c - transform_points(T_gt, pts.mean(0)[None])[0]
    assert float(d[:, 2].abs().max()) <= 120.0 + 1e-6 and float(d[:, 2].abs().max()) > 30.0  # depth N(0, 60) truncated at 2 SD
    K = intr.K(torch.float64)
    u = K[0, 0] * c[:, 0] / c[:, 2] + K[0, 2]
    assert bool(((u >= 0.1 * intr.width) & (u <= 0.9 * intr.width)).all())
    assert torch.equal(starts, seed_like_starts(T_gt, pts, intr, 60, seed=1))  # deterministic


def test_tracking_evaluation_runs_the_node_pipeline_and_reports_each_sequence():
    """evaluate_tracking (reg2d3d_ros.eval.run_ppc) end to end on one short sequence (was broken once)."""
    from reg2d3d_ros.eval.run_ppc import evaluate_tracking
    from reg2d3d_ros.example import load_example

    ct = load_example()
    rows = evaluate_tracking(ct, ("T10",), ("lateral",), n_frames=5, size=128, seed=9, progress=False, jump_frame=3, moving="roi", search_range_mm=30.0)
    assert len(rows) == 1
    r = rows[0]
    assert r["vertebra"] == "T10" and r["frames"] == 5 and len(r["per_frame_mrpd_mm"]) == 5
    assert 1 <= r["published"] <= 5 and r["published"] + r["judged_lost"] == 5
    assert r["per_frame_mrpd_mm"][0] is not None and r["per_frame_mrpd_mm"][0] < 3.0  # frame 0 starts at its ground truth


def test_a_polished_method_also_yields_its_unpolished_rows():
    """run_ppc --polish reports the search with and without the polish from the same runs."""
    from reg2d3d_ros.eval.run_ppc import registration_tables, without_polish

    rows = [{"vertebra": "T8", "view": "ap", "initial_mtre_mm": 3.0 + i, "final_mrpd_mm": 0.4, "mrpd_before_polish_mm": 2.5 if i == 0 else 0.9,
             "iterations": 10, "seconds": 6.0, "polish_seconds": 2.0, "inlier_fraction": 0.6} for i in range(4)]
    plain = without_polish(rows)
    assert [r["final_mrpd_mm"] for r in plain] == [2.5, 0.9, 0.9, 0.9] and all(r["seconds"] == 4.0 for r in plain)
    assert rows[0]["final_mrpd_mm"] == 0.4  # the polished rows are left as they are
    _, summaries = registration_tables({"search": plain, "search + polish": rows}, ["ap"], 30.0)
    assert summaries["search"]["sr_percent"] == 75.0 and summaries["search + polish"]["sr_percent"] == 100.0


def test_cases_with_randomised_physics_differ_per_case_and_keep_the_geometry():
    from reg2d3d_ros.errors import ConfigError
    from reg2d3d_ros.eval.cases import CaseSet, make_cases
    from reg2d3d_ros.example import load_example
    from reg2d3d_ros.sim import CArmSetup

    ct = load_example()
    setup = CArmSetup().at_size(64)
    nominal = make_cases(ct, CaseSet("n", ("T8",), seed=3), 2, setup=setup)
    rand = make_cases(ct, CaseSet("r", ("T8",), seed=3, physics="randomised"), 2, setup=setup)
    for a, b in zip(nominal, rand):
        assert torch.equal(a.T_gt, b.T_gt) and torch.equal(a.starts, b.starts)  # same views and starts
        assert b.image_att.shape == (64, 64) and np.isfinite(b.image_att).all()
        assert not np.allclose(a.image_att, b.image_att)
    assert not np.allclose(rand[0].image_att / rand[0].image_att.std(), rand[1].image_att / rand[1].image_att.std())
    with pytest.raises(ConfigError, match="physics"):
        make_cases(ct, CaseSet("x", ("T8",), physics="cartoon"), 1, setup=setup)
