"""DRR renderer against analytic phantoms: line integrals, surface crossings, gradients."""

import math

import numpy as np
import pytest
import torch

from reg2d3d_ros.drr import DRRRenderer, downsample, image_gradients
from reg2d3d_ros.geometry import CArmIntrinsics, carm_pose, pixel_rays_optical, se3_exp, source_position_ct


def ball_phantom(n=64, spacing=1.5, radius_vox=20.0, supersample=4):
    """Anti-aliased ball centred at the CT origin: occupancy (D, H, W) and affine."""
    c = (n - 1) / 2
    k, j, i = np.meshgrid(*[np.arange(n, dtype=np.float64)] * 3, indexing="ij")
    occ = np.zeros((n, n, n))
    offs = (np.arange(supersample) + 0.5) / supersample - 0.5
    for a in offs:
        for b in offs:
            for d in offs:
                occ += ((i + a - c) ** 2 + (j + b - c) ** 2 + (k + d - c) ** 2) <= radius_vox**2
    occ /= supersample**3
    T = np.diag([spacing, spacing, spacing, 1.0])
    T[:3, 3] = -c * spacing
    return occ.astype(np.float32), T, radius_vox * spacing


def ray_sphere(T, K, H, W, radius_mm):
    """Exact entry distance and chord of each pixel ray with a sphere at the origin."""
    d = pixel_rays_optical(K, H, W) @ T[:3, :3]
    src = source_position_ct(T)
    b = d @ src
    disc = b * b - (src @ src - radius_mm**2)
    sq = torch.sqrt(disc.clamp(min=0))
    return -b - sq, 2 * sq, src, d


def test_box_phantom_exact_line_integrals():
    # A box whose faces lie on voxel midplanes: the trilinear field ramps linearly across each
    # face, so the line integral equals that of the sharp box with faces at the midplane.
    n, sp, mu0 = 48, 2.0, 0.025
    vol = np.zeros((n, n, n), np.float32)
    lo, hi = 12, 36  # voxels 12..35 inside
    vol[lo:hi, lo:hi, lo:hi] = mu0
    T_ijk = np.diag([sp, sp, sp, 1.0])
    T_ijk[:3, 3] = -((n - 1) / 2) * sp
    box_lo = (lo - 0.5 - (n - 1) / 2) * sp
    box_hi = (hi - 0.5 - (n - 1) / 2) * sp
    rend = DRRRenderer(torch.from_numpy(vol), T_ijk, step_mm=0.25)
    intr = CArmIntrinsics.from_detector(1000.0, 1.0, 96, 96)
    T = se3_exp(torch.tensor([0.05, -0.08, 0.03, 2.0, -3.0, 0.0], dtype=torch.float64)) @ carm_pose([0.0, 0.0, 0.0], 600.0, lao_deg=12.0, cran_deg=7.0)
    L = rend.render(T, intr.K(), 96, 96).line_integral[0].double().reshape(-1)
    # exact chord through the sharp box (slab test)
    d = pixel_rays_optical(intr.K(), 96, 96) @ T[:3, :3]
    src = source_position_ct(T)
    t1 = (box_lo - src) / d
    t2 = (box_hi - src) / d
    near = torch.minimum(t1, t2).max(dim=-1).values
    far = torch.maximum(t1, t2).min(dim=-1).values
    chord = (far - near).clamp(min=0)
    # rays well inside the faces (away from edges, where the 3-D ramps overlap)
    p_near = src + near[:, None] * d
    p_far = src + far[:, None] * d

    def face_margin(p):
        # distance of an entry/exit point from the edges of its face (second-largest |coordinate| margin)
        m = (box_hi - p.abs()).sort(dim=-1).values
        return m[:, 1]

    ok = (chord > 10.0) & (face_margin(p_near) > 2 * sp) & (face_margin(p_far) > 2 * sp)
    assert ok.sum() > 100
    rel = ((L - mu0 * chord).abs() / (mu0 * chord))[ok]
    assert float(rel.max()) < 0.005, f"max relative error {float(rel.max()):.4f}"
    # rays that miss the box by more than the half-voxel ramp of its faces are exactly zero
    t1 = (box_lo - sp - src) / d
    t2 = (box_hi + sp - src) / d
    far_miss = torch.maximum(t1, t2).min(dim=-1).values <= torch.minimum(t1, t2).max(dim=-1).values
    assert far_miss.sum() > 100 and float(L[far_miss].abs().max()) == 0.0


def test_ball_phantom_line_integrals_within_one_percent():
    occ, T_ijk, R = ball_phantom()
    mu0 = 0.03
    rend = DRRRenderer(torch.from_numpy(occ * mu0), T_ijk, step_mm=0.5)
    intr = CArmIntrinsics.from_detector(1000.0, 2.0, 64, 64)
    T = carm_pose([0.0, 0.0, 0.0], 600.0, lao_deg=-20.0, cran_deg=15.0)
    L = rend.render(T[None], intr.K(), 64, 64).line_integral[0].double().reshape(-1)
    _, chord, _, _ = ray_sphere(T, intr.K(), 64, 64, R)
    # Away from the rim: there the voxel model's blur (trilinear + partial volume, variance about
    # 0.25 voxel^2) changes the chord by about 0.25 (2R^2 - r^2) / (R^2 - r^2)^2 (relative, in
    # voxels), 0.7 % at r = 0.8 R; at r = 0.6 R (chord = 0.8 diameter) it is about 0.25 %.
    inner = chord > 0.8 * 2 * R
    assert inner.sum() > 300
    rel = ((L - mu0 * chord).abs() / (mu0 * chord))[inner]
    assert float(rel.max()) < 0.01, f"max relative error {float(rel.max()):.4f}"


def test_surface_crossings_within_half_a_voxel():
    occ, T_ijk, R = ball_phantom()
    spacing = 1.5
    rend = DRRRenderer(torch.from_numpy(occ * 0.03), T_ijk, occupancy=torch.from_numpy(occ), step_mm=0.5)
    intr = CArmIntrinsics.from_detector(1000.0, 2.0, 64, 64)
    T = carm_pose([3.0, -2.0, 1.0], 600.0, lao_deg=40.0)
    out = rend.render(T[None], intr.K(), 64, 64, surfaces=True)
    s_in, chord, src, d = ray_sphere(T, intr.K(), 64, 64, R)
    hit_true = chord > 0
    p_in = src + s_in[:, None] * d
    p_out = src + (s_in + chord)[:, None] * d
    hit = out.hit[0].reshape(-1)
    solid = chord > 4 * spacing  # rays that clearly cross the ball
    assert bool(hit[solid].all())
    # every crossing found lies on the true sphere to within half a voxel
    for pts in (out.entry_ct_mm[0].reshape(-1, 3), out.exit_ct_mm[0].reshape(-1, 3)):
        surface_dist = (pts.double().norm(dim=-1) - R).abs()[hit]
        assert float(surface_dist.max()) < 0.5 * spacing
    # and at the right place along the ray, except for grazing rays (there a tiny radial
    # difference moves the crossing far along the nearly tangent ray)
    solid = chord > 0.3 * 2 * R
    dist = torch.sqrt((src @ src - (d @ src) ** 2).clamp(min=0))  # ray to ball-centre distance
    assert not bool(hit[dist > R + 0.5 * spacing].any())  # no bone where the ray clearly misses the ball
    e_in = (out.entry_ct_mm[0].reshape(-1, 3).double() - p_in).norm(dim=-1)[solid]
    e_out = (out.exit_ct_mm[0].reshape(-1, 3).double() - p_out).norm(dim=-1)[solid]
    assert float(e_in.max()) < 0.5 * spacing and float(e_out.max()) < 0.5 * spacing
    # depths are the optical z of the crossing points
    z_in = (out.entry_ct_mm[0].reshape(-1, 3).double() @ T[:3, :3].T + T[:3, 3])[:, 2]
    assert torch.allclose(z_in[hit], out.entry_depth_mm[0].reshape(-1)[hit].double(), atol=1e-3)
    assert bool((out.exit_depth_mm[0] >= out.entry_depth_mm[0]).all())


def test_batch_equals_single_and_dtypes_follow_inputs():
    occ, T_ijk, _ = ball_phantom(n=32, radius_vox=10)
    rend = DRRRenderer(torch.from_numpy(occ * 0.02), T_ijk)
    intr = CArmIntrinsics.from_detector(1000.0, 2.0, 32, 24)
    T = torch.stack([carm_pose([0, 0, 0], 500.0, lao_deg=a) for a in (0.0, 30.0)])
    both = rend.render(T, intr.K(), 24, 32).line_integral
    assert both.shape == (2, 24, 32) and both.dtype == torch.float32
    for b in range(2):
        single = rend.render(T[b], intr.K(), 24, 32).line_integral[0]
        assert torch.allclose(both[b], single, atol=1e-5)
    assert not torch.allclose(both[0], both[1])  # the views differ
    small_chunks = DRRRenderer(torch.from_numpy(occ * 0.02), T_ijk, max_samples_per_chunk=5000)
    assert torch.allclose(small_chunks.render(T, intr.K(), 24, 32).line_integral, both, atol=1e-5)


def test_render_is_differentiable_wrt_pose():
    occ, T_ijk, _ = ball_phantom(n=32, radius_vox=9)
    # an off-centre, asymmetric blob so that every pose parameter changes the image
    occ = occ * np.linspace(0.5, 1.5, 32)[None, None, :].astype(np.float32)
    rend = DRRRenderer(torch.from_numpy(occ * 0.03), T_ijk, step_mm=0.75)
    intr = CArmIntrinsics.from_detector(1000.0, 2.0, 32, 32)
    T0 = carm_pose([2.0, 1.0, 0.0], 500.0, lao_deg=10.0)
    target = rend.render(se3_exp(torch.tensor([0.02, 0.0, 0.01, 1.0, -1.0, 0.0], dtype=torch.float64)) @ T0, intr.K(), 32, 32).line_integral.detach()

    def loss(xi):
        img = rend.render(se3_exp(xi) @ T0, intr.K(), 32, 32).line_integral
        return ((img - target) ** 2).sum()

    xi = torch.zeros(6, dtype=torch.float64, requires_grad=True)
    g = torch.autograd.grad(loss(xi), xi)[0]
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    # finite differences along the gradient direction agree in sign and roughly in size
    u = g / g.norm()
    eps = 1e-3
    with torch.no_grad():
        fd = (loss(eps * u) - loss(-eps * u)) / (2 * eps)
    assert float(fd) > 0
    assert float(fd) == pytest.approx(float(g.norm()), rel=0.2)


def test_image_gradients_and_downsample():
    v, u = torch.meshgrid(torch.arange(20.0), torch.arange(30.0), indexing="ij")
    img = (3.0 * u - 2.0 * v)[None]
    g = image_gradients(img)
    assert g.shape == (1, 2, 20, 30)
    assert torch.allclose(g[0, 0, 1:-1, 1:-1], torch.full((18, 28), 3.0))
    assert torch.allclose(g[0, 1, 1:-1, 1:-1], torch.full((18, 28), -2.0))
    # downsample keeps the pixel-centre convention: a linear ramp stays linear with the scaled coordinates
    small = downsample(img, 0.5)
    assert small.shape == (1, 10, 15)
    vs, us = torch.meshgrid(torch.arange(10.0), torch.arange(15.0), indexing="ij")  # small-image pixels
    # small pixel (us, vs) is centred on full-resolution coordinate 2 * us + 0.5 (u' = s (u + 0.5) - 0.5)
    assert torch.allclose(small[0], 3.0 * (2 * us + 0.5) - 2.0 * (2 * vs + 0.5), atol=1e-4)


def test_render_at_scaled_intrinsics_matches_downsampled_render():
    occ, T_ijk, _ = ball_phantom(n=48, radius_vox=14)
    rend = DRRRenderer(torch.from_numpy(occ * 0.03), T_ijk)
    intr = CArmIntrinsics.from_detector(1000.0, 1.0, 128, 128)
    T = carm_pose([4.0, 0.0, -3.0], 600.0, lao_deg=15.0)
    full = rend.render(T, intr.K(), 128, 128).line_integral
    small_intr = intr.scaled(0.25)
    small = rend.render(T, small_intr.K(), small_intr.height, small_intr.width).line_integral
    down = downsample(full, 0.25)
    a, b = small.flatten() - small.mean(), down.flatten() - down.mean()
    ncc = float((a * b).sum() / (a.norm() * b.norm()))
    assert ncc > 0.99


def test_surfaces_require_occupancy():
    occ, T_ijk, _ = ball_phantom(n=16, radius_vox=4)
    rend = DRRRenderer(torch.from_numpy(occ), T_ijk)
    with pytest.raises(Exception, match="occupancy"):
        rend.render(carm_pose([0, 0, 0], 500.0), torch.eye(3, dtype=torch.float64) * 100, 8, 8, surfaces=True)
    assert math.isfinite(rend.step_mm)
