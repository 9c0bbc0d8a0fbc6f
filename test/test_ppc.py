"""PPC: solver with known motion, MCCR with outliers, contours of an analytic shape, NGC search,
3-D Canny on a phantom, and end-to-end registration / tracking on simulated frames."""

import math

import numpy as np
import pytest
import torch

from reg2d3d_ros.errors import ModelLoadError
from reg2d3d_ros.geometry import CArmIntrinsics, project_points, so3_exp, transform_points
from reg2d3d_ros.ppc import (
    NO_DEPTH,
    SurfacePoints,
    canny_surface_points,
    motion_about,
    ngc_search,
    select_contours,
    solve_ppc,
)
from reg2d3d_ros.volume import CTVolume

K = torch.tensor([[850.0, 0.0, 128.0], [0.0, 850.0, 128.0], [0.0, 0.0, 1.0]], dtype=torch.float64)


def contour_points(n=400, seed=0):
    """Random points near (0, 0, 700) mm with unit normals perpendicular to their viewing rays."""
    g = torch.Generator().manual_seed(seed)
    w = torch.tensor([5.0, -3.0, 700.0], dtype=torch.float64) + torch.randn(n, 3, generator=g, dtype=torch.float64) * torch.tensor([25.0, 25.0, 20.0], dtype=torch.float64)
    r = w / w.norm(dim=-1, keepdim=True)
    nrm = torch.randn(n, 3, generator=g, dtype=torch.float64)
    nrm = nrm - (nrm * r).sum(-1, keepdim=True) * r
    return w, nrm / nrm.norm(dim=-1, keepdim=True)


def project(w):
    q = w @ K.T
    return q[:, :2] / q[:, 2:]


DV_TRUE = torch.tensor([0.01, -0.02, 0.015, 1.0, -0.5, 2.0], dtype=torch.float64)


def test_pure_translation_is_recovered_exactly_in_one_step():
    w, g = contour_points()
    dv = torch.tensor([0.0, 0.0, 0.0, 1.5, -0.7, 3.0], dtype=torch.float64)
    uv = project(w + dv[3:])
    sol = solve_ppc(w[None], g[None], uv[None], K)
    assert torch.allclose(sol.dv[0], dv, atol=1e-9)
    assert float(sol.residual_mm.abs().max()) < 1e-9


def test_known_motion_is_recovered_exactly_by_iterating():
    w, g = contour_points()
    M = motion_about(DV_TRUE[None], w.mean(0)[None])[0]
    uv = project(transform_points(M, w))
    one = solve_ppc(w[None], g[None], uv[None], K)
    assert torch.allclose(one.dv[0, :3], DV_TRUE[:3], atol=5e-4)  # small-angle linearisation: close after one step
    T = torch.eye(4, dtype=torch.float64)
    for _ in range(6):
        s = solve_ppc(transform_points(T, w)[None], (g @ T[:3, :3].T)[None], uv[None], K)
        T = s.transform()[0] @ T
    assert torch.allclose(T, M, atol=1e-9)


def test_correspondences_only_constrain_across_the_contour():
    """Sliding a correspondence along its image contour changes nothing (the aperture problem)."""
    w, g = contour_points(200, seed=3)
    M = motion_about(DV_TRUE[None], w.mean(0)[None])[0]
    uv = project(transform_points(M, w))
    # the image tangent of the contour at w: projection of t = r x g
    r = w / w.norm(dim=-1, keepdim=True)
    t3 = torch.linalg.cross(r, g, dim=-1)
    t2 = project(w + 0.01 * t3) - project(w)
    t2 = t2 / t2.norm(dim=-1, keepdim=True)
    a = solve_ppc(w[None], g[None], uv[None], K).dv
    b = solve_ppc(w[None], g[None], (uv + 3.0 * t2)[None], K).dv
    assert torch.allclose(a, b, atol=0.02 * DV_TRUE.abs().max())


def test_mccr_recovers_motion_with_30_percent_outliers():
    w, g = contour_points(500, seed=1)
    dv = torch.tensor([0.004, -0.006, 0.01, 0.8, -0.6, 1.0], dtype=torch.float64)
    M = motion_about(dv[None], w.mean(0)[None])[0]
    uv = project(transform_points(M, w))
    gen = torch.Generator().manual_seed(2)
    out = torch.rand(len(w), generator=gen) < 0.3
    uv_bad = uv.clone()
    uv_bad[out] += (torch.rand(int(out.sum()), 2, generator=gen, dtype=torch.float64) - 0.5) * 30.0  # +-15 px
    plain = solve_ppc(w[None], g[None], uv_bad[None], K, robust="none")
    robust = solve_ppc(w[None], g[None], uv_bad[None], K, robust="mccr", mccr_iterations=20)

    def err(sol):
        Mest = sol.transform()[0]
        return float((transform_points(Mest, w) - transform_points(M, w)).norm(dim=-1).mean())

    assert err(plain) > 0.5  # least squares is pulled away by the outliers
    assert err(robust) < 0.1 * err(plain) and err(robust) < 0.1  # MCCR is not
    assert float(robust.weights[0, out].mean()) < 0.2 * float(robust.weights[0, ~out].mean())


def test_dof_mask_prior_and_anchor():
    w, g = contour_points()
    M = motion_about(DV_TRUE[None], w.mean(0)[None])[0]
    uv = project(transform_points(M, w))
    masked = solve_ppc(w[None], g[None], uv[None], K, dof_mask=NO_DEPTH)
    assert float(masked.dv[0, 5]) == 0.0 and float(masked.dv[0, 3:5].abs().max()) > 0.3
    strong = solve_ppc(w[None], g[None], uv[None], K, prior_precision=torch.full((6,), 1e9, dtype=torch.float64))
    assert float(strong.dv.abs().max()) < 1e-4  # a tight prior on the update keeps it at zero
    anchor = torch.zeros(6, dtype=torch.float64)
    anchor[3] = 5.0  # we are 5 mm off the anchor along x: a tight anchor brings us back
    pulled = solve_ppc(w[None], g[None], uv[None], K, anchor_precision=torch.tensor([0, 0, 0, 1e9, 0, 0], dtype=torch.float64), anchor_offset=anchor)
    assert float(pulled.dv[0, 3]) == pytest.approx(-5.0, abs=1e-3)


def test_contour_selection_on_a_sphere():
    # surface points of a sphere of radius R centred on the principal ray at distance D
    R, D = 30.0, 700.0
    g = torch.Generator().manual_seed(0)
    n = torch.randn(20000, 3, generator=g, dtype=torch.float64)
    n = n / n.norm(dim=-1, keepdim=True)
    centre = torch.tensor([0.0, 0.0, D], dtype=torch.float64)
    pts = centre + R * n
    normals = -n  # gradients point into the (dense) sphere
    T = torch.eye(4, dtype=torch.float64)
    c = select_contours(pts, normals, T, K, 256, 256, max_cos=0.05, cell_px=1.0)
    assert len(c) > 100
    r = c.w_opt / c.w_opt.norm(dim=-1, keepdim=True)
    assert float((c.g_opt * r).sum(-1).abs().max()) <= 0.05
    # the silhouette of a sphere seen from a point is a circle of radius f R / sqrt(D^2 - R^2)
    radius = 850.0 * R / math.sqrt(D * D - R * R)
    dist = (c.uv - torch.tensor([128.0, 128.0], dtype=torch.float64)).norm(dim=-1)
    assert float((dist - radius).abs().max()) < 0.05 * 850.0 * R / D + 0.5  # |cos| <= 0.05 band
    # 2-D normals point towards the inside of the silhouette (towards the bone)
    inward = (torch.tensor([128.0, 128.0], dtype=torch.float64) - c.uv) / dist[:, None]
    assert float((c.normal_2d * inward).sum(-1).min()) > 0.99
    # one point per pixel cell
    cells = set(map(tuple, torch.floor(c.uv).long().tolist()))
    assert len(cells) == len(c)


def test_ngc_search_finds_known_shift_along_normal():
    g = torch.Generator().manual_seed(0)
    base = torch.nn.functional.avg_pool2d(torch.rand(1, 1, 80, 80, generator=g, dtype=torch.float64), 5, 1, 2)[0, 0]
    from reg2d3d_ros.ppc.matching import gradient_image

    moving = gradient_image(base, 1.0)
    shift = torch.tensor([2.4, -1.3], dtype=torch.float64)  # fixed = moving moved by this (pixels)
    yy, xx = torch.meshgrid(torch.arange(80.0, dtype=torch.float64), torch.arange(80.0, dtype=torch.float64), indexing="ij")
    grid = torch.stack([(xx - shift[0]) / 79 * 2 - 1, (yy - shift[1]) / 79 * 2 - 1], dim=-1)[None]
    fixed = torch.nn.functional.grid_sample(moving[None], grid, align_corners=True, padding_mode="border")[0]
    uv = torch.tensor([[30.0, 30.0], [45.0, 40.0], [35.0, 50.0]], dtype=torch.float64)
    nrm = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, -1.0]], dtype=torch.float64)
    uv_c, score, sh, at_limit = ngc_search(fixed, moving, uv, nrm, search_px=6, patch_half=3, patch_half_along=3)
    assert torch.allclose(sh, nrm @ shift, atol=0.35)  # the shift's component along each normal
    # the shift also has a component along the contour, which the search cannot undo: lower scores
    assert bool((score > 0.5).all()) and not bool(at_limit.any())
    _, _, _, lim = ngc_search(fixed, moving, uv[:1], nrm[:1], search_px=1, patch_half=3)
    assert bool(lim.all())  # 2.4 px away but only +-1 searched: flagged


def test_canny_surface_points_of_a_ball_phantom():
    n, sp, R = 48, 1.0, 15.0
    k, j, i = np.meshgrid(*[np.arange(n, dtype=float)] * 3, indexing="ij")
    c = (n - 1) / 2
    dist = np.sqrt((i - c) ** 2 + (j - c) ** 2 + (k - c) ** 2)
    hu = np.where(dist <= R, 700.0, 0.0).astype(np.float32)
    T = np.diag([sp, sp, sp, 1.0])
    T[:3, 3] = -c * sp
    ct = CTVolume(hu=hu, T_ct_from_ijk=T)
    surf = canny_surface_points(ct, sigma_mm=1.0, low=30, high=80)
    assert len(surf) > 500
    r = np.linalg.norm(surf.pts_ct_mm, axis=1)
    assert np.abs(r - R).max() < 0.5 * sp  # on the surface within half a voxel
    radial = surf.pts_ct_mm / r[:, None]
    assert (np.sum(surf.normals_ct * radial, axis=1) < -0.95).all()  # gradients point into the ball


def test_surface_points_save_load(tmp_path):
    sp = SurfacePoints(np.random.rand(10, 3), np.eye(3)[np.arange(10) % 3], np.ones(10))
    sp.save(tmp_path / "s.npz")
    back = SurfacePoints.load(tmp_path / "s.npz")
    assert np.array_equal(back.pts_ct_mm, sp.pts_ct_mm) and np.array_equal(back.normals_ct, sp.normals_ct)
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    with pytest.raises(ModelLoadError):
        SurfacePoints.load(tmp_path / "bad.npz")


def rotated_start(T_gt, pts_ct_mm, axis: int, deg: float, shift_mm=(0.0, 0.0, 0.0)):
    """``T_gt`` rotated by ``deg`` about optical axis ``axis`` (0 x, 1 y, 2 z) through the
    points' centre, then shifted by ``shift_mm`` (optical frame): a start pose ``(4, 4)``."""
    T0 = T_gt.clone()
    c = T0[:3, :3] @ pts_ct_mm.mean(0) + T0[:3, 3]
    R = so3_exp(math.radians(deg) * torch.eye(3, dtype=torch.float64)[axis])
    T0[:3, :3] = R @ T0[:3, :3]
    T0[:3, 3] = R @ (T0[:3, 3] - c) + c + torch.tensor(shift_mm, dtype=torch.float64)
    return T0


@pytest.fixture(scope="module")
def tuning_lateral_case():  # noqa: D103
    from reg2d3d_ros.eval.cases import CaseSet, make_cases
    from reg2d3d_ros.example import load_example
    from reg2d3d_ros.ppc import PPCRegistrator

    ct = load_example()
    # a tuning case (T7 lateral) whose PPC optimum lies near the ground truth (0.6 mm from it);
    # the statistics over all cases are the evaluation's job (reg2d3d_ros.eval.run_ppc)
    case = make_cases(ct, CaseSet("t", ("T7",), views=("lateral",), seed=1001), 1)[0]
    return ct, case, PPCRegistrator.from_ct(ct, "T7")


def test_end_to_end_registration_from_5mm(tuning_lateral_case):
    from reg2d3d_ros.eval import mrpd, random_starts

    ct, case, reg = tuning_lateral_case
    # 5 mm starts led by translation (rotation <= 5 deg), as from a C-arm's angles
    starts, e0 = random_starts(case.T_gt, case.target_pts, 3, min_mtre_mm=4.9, max_mtre_mm=5.1, seed=4, max_rotation_deg=5.0)
    for k in range(3):
        before = float(mrpd(starts[k], case.T_gt, case.target_pts))
        r = reg.register(case.image_att, case.intrinsics, starts[k])
        after = float(mrpd(r.T_optical_from_ct, case.T_gt, case.target_pts))
        assert after < 2.0 and after < before, f"start {k}: mRPD {before:.2f} -> {after:.2f}"
        assert r.inlier_fraction > 0.3 and r.iterations >= 3


def test_moving_image_of_the_roi_shows_the_neighbours_and_still_registers(tuning_lateral_case):
    from reg2d3d_ros.errors import ConfigError
    from reg2d3d_ros.eval import mrpd
    from reg2d3d_ros.ppc import PPCRegistrator

    ct, case, reg = tuning_lateral_case
    roi_reg = PPCRegistrator.from_ct(ct, "T7", moving="roi")
    assert len(roi_reg.surface) == len(reg.surface)  # the same contour points (the target's)
    K = case.intrinsics.K(torch.float64)
    h, w = case.intrinsics.height, case.intrinsics.width
    target = reg.renderer.render(case.T_gt[None], K, h, w).line_integral[0]
    roi = roi_reg.renderer.render(case.T_gt[None], K, h, w).line_integral[0]
    # more bone in view (neighbouring vertebrae, ribs), and all of the target's
    assert float((roi > 1e-3).float().mean()) > 1.3 * float((target > 1e-3).float().mean())
    assert float(roi.sum()) > float(target.sum())
    r = roi_reg.register(case.image_att, case.intrinsics, case.T_gt)
    assert float(mrpd(r.T_optical_from_ct, case.T_gt, case.target_pts)) < 1.0
    with pytest.raises(ConfigError, match="moving"):
        PPCRegistrator.from_ct(ct, "T7", moving="all")


def test_tracking_follows_smooth_motion(tuning_lateral_case):
    from reg2d3d_ros.eval import mrpd
    from reg2d3d_ros.images import to_attenuation
    from reg2d3d_ros.sim import CArmSetup, XrayDegradation, make_trajectory, simulate_sequence, xray_renderer

    ct, case, reg = tuning_lateral_case
    setup = CArmSetup()
    centre = case.target_pts.mean(0).numpy()
    poses = make_trajectory("smooth", case.T_gt, 6, centre, setup, seed=1000)
    seq = simulate_sequence(xray_renderer(ct), setup.intrinsics(), poses, XrayDegradation(), seed=1)
    T = poses[0]
    for f in range(1, 6):
        r = reg.track(to_attenuation(seq.images[f].astype(np.float32), "attenuation"), setup.intrinsics(), T)
        T = r.T_optical_from_ct
        assert float(mrpd(T, poses[f], case.target_pts)) < 2.0  # the success threshold
    assert float(mrpd(poses[0], poses[-1], case.target_pts)) > 0.1  # it did move
    assert torch.is_tensor(so3_exp(torch.zeros(3)))
    assert project_points is not None and CArmIntrinsics is not None


def test_band_render_is_exact_where_ngc_samples_it(tuning_lateral_case):
    """The tracking update renders only a band around the contour points: the NGC templates it
    samples must equal those of the whole-frame render, with a fraction of the rays."""
    from reg2d3d_ros.ppc.matching import _sample
    from reg2d3d_ros.ppc.register import band_mask

    ct, case, reg = tuning_lateral_case
    intr, T = case.intrinsics, case.T_gt
    c, _ = reg.contours_at(T, intr, whole_image=False)
    full = reg.moving_gradient(T, intr).double()
    band = reg.moving_gradient(T, intr, around_uv=c.uv).double()
    cfg = reg.config
    a = torch.arange(-cfg.patch_half, cfg.patch_half + 1, dtype=torch.float64)
    b = torch.arange(-cfg.patch_half_along, cfg.patch_half_along + 1, dtype=torch.float64)
    A, B = torch.meshgrid(a, b, indexing="ij")
    tang = torch.stack([-c.normal_2d[:, 1], c.normal_2d[:, 0]], -1)
    at = c.uv[:, None] + A.reshape(1, -1, 1) * c.normal_2d[:, None] + B.reshape(1, -1, 1) * tang[:, None]
    t_full, t_band = _sample(full, at), _sample(band, at)
    assert float((t_full - t_band).abs().max()) <= 1e-4 * float(t_full.abs().max())
    mask = band_mask(c.uv, intr.height, intr.width, reg.band_radius_px())
    assert float(mask.float().mean()) < 0.8  # it is a band, not the frame
    assert float((full - band).abs().max()) > 1e-3 * float(full.abs().max())  # and outside it the image is not rendered


def test_levels_mean_the_same_physical_pixel_size():
    from reg2d3d_ros.geometry import CArmIntrinsics
    from reg2d3d_ros.ppc import PPCConfig
    from reg2d3d_ros.ppc.register import effective_levels

    cfg = PPCConfig()  # levels (0.25, 0.5, 1.0), iterations (8, 8, 6), search (6, 6, 4)
    ref = CArmIntrinsics.from_detector(1020.0, 0.6, 512, 512)
    assert effective_levels(cfg, ref) == [(0.25, 8, 6), (0.5, 8, 6), (1.0, 6, 4)]
    half = CArmIntrinsics.from_detector(1020.0, 1.2, 256, 256)  # 2x coarser pixels
    assert effective_levels(cfg, half) == [(0.5, 8, 6), (1.0, 6, 4)]  # 0.5 and 1.0 merged, the finer kept
    fine = CArmIntrinsics.from_detector(1020.0, 0.3, 1024, 1024)  # finer frames: factors as given
    assert effective_levels(cfg, fine) == [(0.25, 8, 6), (0.5, 8, 6), (1.0, 6, 4)]
    coarse = CArmIntrinsics.from_detector(1020.0, 4.8, 64, 64)
    assert effective_levels(cfg, coarse) == [(1.0, 6, 4)]


def test_ngc_map_peaks_at_the_known_shift():
    from reg2d3d_ros.ppc.matching import gradient_image
    from reg2d3d_ros.ppc.search import ngc_map

    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")

    def blobs(centres):
        return sum(a * torch.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * s**2)) for x, y, s, a in centres)

    shape = [(30.0, 30.0, 3.0, 1.0), (38.0, 26.0, 2.0, 0.7), (27.0, 37.0, 4.0, 0.5)]
    du, dv = 5, -3  # the frame shows the structure moved right by 5 and up by 3 pixels
    moving = blobs(shape)
    fixed = blobs([(x + du, y + dv, s, a) for x, y, s, a in shape] + [(10.0, 52.0, 3.0, 1.0), (52.0, 10.0, 2.5, 0.8)])
    fixed = fixed + 0.01 * torch.randn(64, 64, generator=torch.Generator().manual_seed(3))
    gf, gm = gradient_image(fixed, 1.0), gradient_image(moving, 1.0)
    fp = moving > 1e-3
    m = 8
    ngc = ngc_map(gf, gm, fp, m)
    assert ngc.shape == (2 * m + 1, 2 * m + 1)
    r, c = divmod(int(ngc.argmax()), 2 * m + 1)
    assert (c - m, r - m) == (du, dv)
    assert float(ngc.max()) > 0.9  # the same structure, up to the noise
    assert float(ngc[m, m]) < 0.5  # unshifted: misaligned


def test_inplane_search_finds_a_start_20mm_off_in_the_image_plane(tuning_lateral_case):
    from dataclasses import replace

    from reg2d3d_ros.eval import mrpd
    from reg2d3d_ros.ppc import PPCConfig, PPCRegistrator
    from reg2d3d_ros.ppc.search import inplane_search

    ct, case, _ = tuning_lateral_case
    reg = PPCRegistrator.from_ct(ct, "T7", moving="roi")
    # 20 mm across the image plane (beyond the local search of the coarsest level) and 6 degrees
    # about the principal ray
    T0 = rotated_start(case.T_gt, reg.pts, 2, 6.0, (-12.0, 16.0, 0.0))
    before = float(mrpd(T0, case.T_gt, case.target_pts))
    assert before > 15.0
    found = inplane_search(reg, case.image_att, case.intrinsics, T0, range_mm=30.0)
    assert 1 <= len(found) <= 3 and found[0].score >= found[-1].score
    assert float(mrpd(found[0].T_optical_from_ct, case.T_gt, case.target_pts)) < 4.0
    for a_, b_ in zip(found, found[1:]):  # distinct candidates
        assert math.hypot(a_.shift_mm[0] - b_.shift_mm[0], a_.shift_mm[1] - b_.shift_mm[1]) >= 8.0
    # registration with the search ends at the truth; history records which candidate won
    r = reg.register(case.image_att, case.intrinsics, T0, config=replace(PPCConfig(), search_range_mm=30.0))
    assert float(mrpd(r.T_optical_from_ct, case.T_gt, case.target_pts)) < 2.0
    assert {st["candidate"] for st in r.history} == {0, 1, 2, 3} and r.candidate >= 1


def test_pose_gradient_correlation_is_highest_at_the_truth(tuning_lateral_case):
    from reg2d3d_ros.ppc.search import pose_gradient_correlation

    ct, case, reg = tuning_lateral_case
    at_truth = pose_gradient_correlation(reg, case.image_att, case.intrinsics, case.T_gt)
    scores = []
    for dx, dy in ((4.0, 0.0), (0.0, -4.0), (15.0, 10.0), (0.0, 25.0)):
        T = case.T_gt.clone()
        T[0, 3] += dx
        T[1, 3] += dy
        scores.append(pose_gradient_correlation(reg, case.image_att, case.intrinsics, T))
    assert 0.2 < at_truth <= 1.0 and max(scores) < at_truth, (at_truth, scores)
    T = case.T_gt.clone()
    T[2, 3] = -T[2, 3]  # behind the source: nothing projects
    assert pose_gradient_correlation(reg, case.image_att, case.intrinsics, T) == 0.0


def test_polish_makes_a_nearby_pose_more_precise_and_a_long_move_is_discarded(tuning_lateral_case):
    from dataclasses import replace

    from reg2d3d_ros.errors import ConfigError
    from reg2d3d_ros.eval import mrpd
    from reg2d3d_ros.ppc import PPCConfig, PPCRegistrator

    ct, case, _ = tuning_lateral_case
    reg = PPCRegistrator.from_ct(ct, "T7", moving="roi")
    # about 2 mm off: in-plane shift and a rotation about an image-plane axis
    T0 = rotated_start(case.T_gt, reg.pts, 0, 3.0, (1.2, -1.0, 0.0))
    before = float(mrpd(T0, case.T_gt, case.target_pts))
    assert 1.5 < before < 4.0
    cfg = replace(PPCConfig(), polish_levels=(0.25, 0.5), polish_iterations=(15, 10), polish_max_mm=20.0)  # it also moves in depth
    p = reg.polish(case.image_att, case.intrinsics, T0, config=cfg)
    after = float(mrpd(p["T"], case.T_gt, case.target_pts))
    assert p["kept"] and after < 0.5 * before and after < 1.0, (before, after, {k: v for k, v in p.items() if not k.startswith("T")})
    assert p["gc_after"] > p["gc_before"]  # a kept polish raised the gradient correlation
    assert 0.5 < p["moved_mm"] < cfg.polish_max_mm and torch.equal(p["T_before"], T0)
    # a polish that moves more than polish_max_mm is discarded: register returns the PPC pose
    tight = replace(cfg, polish_max_mm=1e-3)
    r = reg.register(case.image_att, case.intrinsics, T0, config=tight)
    assert r.polish["kept"] is False and r.polish["moved_mm"] > 1e-3
    assert torch.equal(r.T_optical_from_ct, r.polish["T_before"])
    with pytest.raises(ConfigError, match="polish_levels and polish_iterations"):
        PPCConfig(polish_levels=(0.25, 0.5), polish_iterations=(10,))
    with pytest.raises(ConfigError, match="positive"):
        PPCConfig(polish_max_mm=0.0)


def test_guard_keeps_a_good_start_where_unguarded_ppc_walks_away(tuning_lateral_case):
    """A start 12 degrees off about the image's vertical axis (out of plane, weakly observed in
    one view): plain PPC's updates make it worse; guarded updates never lower the gradient
    correlation within a level and end better than the start."""
    from dataclasses import replace

    from reg2d3d_ros.errors import ConfigError
    from reg2d3d_ros.eval import mrpd
    from reg2d3d_ros.ppc import PPCConfig, PPCRegistrator
    from reg2d3d_ros.ppc.search import GradientCorrelation

    ct, case, _ = tuning_lateral_case
    reg = PPCRegistrator.from_ct(ct, "T7", moving="roi")
    T0 = rotated_start(case.T_gt, reg.pts, 1, -12.0)
    before = float(mrpd(T0, case.T_gt, case.target_pts))
    assert 1.5 < before < 2.0
    plain = float(mrpd(reg.register(case.image_att, case.intrinsics, T0).T_optical_from_ct, case.T_gt, case.target_pts))
    assert plain > before + 0.5, "premise: unguarded PPC walks away from this start"
    r = reg.register(case.image_att, case.intrinsics, T0, config=replace(PPCConfig(), guard=True))
    after = float(mrpd(r.T_optical_from_ct, case.T_gt, case.target_pts))
    assert after < before < 2.0, (before, after, plain)
    # within a level, the accepted updates' scores never decrease
    by_level = {}
    for st in r.history:
        assert "accepted" in st and st["step"] in (1.0, 0.5, -1.0, 0.0)
        if st["accepted"]:
            by_level.setdefault(st["level"], []).append(st["gradient_correlation"])
    assert by_level and all(b >= a_ for v in by_level.values() for a_, b in zip(v, v[1:])), by_level
    score = GradientCorrelation(reg, case.image_att, case.intrinsics, level=0.5)
    assert r.gradient_correlation == pytest.approx(score(r.T_optical_from_ct)) and r.gradient_correlation > score(T0)
    with pytest.raises(ConfigError, match="needs guard=True"):
        PPCConfig(search_select="gc")
    with pytest.raises(ConfigError, match="search_select"):
        PPCConfig(guard=True, search_select="best")
    with pytest.raises(ConfigError, match="guard_patience"):
        PPCConfig(guard=True, guard_patience=0)
