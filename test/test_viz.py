"""Overlays: the outline is drawn where the structure projects, as connected lines, on a readable frame."""

import numpy as np
import pytest
import torch

from reg2d3d_ros.geometry import so3_exp
from reg2d3d_ros.viz import GREEN, OutlineOverlay, contrast_normalise, legend_lines, overlay_frame
from reg2d3d_ros.volume import CTVolume

F_PX, Z0_MM, R_MM, SIZE = 800.0, 700.0, 40.0, 160
SPACING = (0.5, 0.5, 1.0)  # anisotropic voxels: the gaps between projected slices must be closed


def _sphere_ct(with_neighbour: bool = False):
    """A CT with a labelled bone sphere (``vertebrae_T8``, radius R_MM) and optionally a box above it (``vertebrae_T7``)."""
    n = (200, 200, 100)  # i, j, k
    ijk = np.stack(np.meshgrid(*[np.arange(m) for m in n], indexing="ij"), axis=-1).astype(np.float64)  # (i, j, k, 3)
    T = np.eye(4)
    T[:3, :3] = np.diag([-SPACING[0], -SPACING[1], SPACING[2]])  # LPS-like flips
    T[:3, 3] = (30.0, -20.0, 100.0)
    pts = ijk @ T[:3, :3].T + T[:3, 3]
    c = pts[n[0] // 2, n[1] // 2, n[2] // 2]
    inside = np.linalg.norm(pts - c, axis=-1) <= R_MM
    labels = inside.astype(np.int16)
    if with_neighbour:
        box = (np.abs(pts[..., 0] - c[0]) < 20) & (np.abs(pts[..., 1] - c[1]) < 20) & (pts[..., 2] > c[2] + 42)
        labels[box] = 2  # runs to the top face of the volume: cut there
    hu = np.where(labels > 0, 800.0, -1000.0).astype(np.float32)
    ct = CTVolume(hu=hu.transpose(2, 1, 0), T_ct_from_ijk=T, labels=labels.transpose(2, 1, 0),
                  label_names={"vertebrae_T8": 1, "vertebrae_T7": 2})
    return ct, c


def _pose(center):
    R = so3_exp(torch.tensor([0.4, -0.7, 0.3], dtype=torch.float64))  # the sphere's silhouette does not change with it
    T = torch.eye(4, dtype=torch.float64)
    T[:3, :3] = R
    T[:3, 3] = torch.tensor([0.0, 0.0, Z0_MM]) - R @ torch.as_tensor(center)
    return T


def _K():
    c = (SIZE - 1) / 2
    return torch.tensor([[F_PX, 0, c], [0, F_PX, c], [0, 0, 1]], dtype=torch.float64)


def _outline_pixels(rgb, colour):
    """Pixels whose colour is dominated by ``colour``'s channel (anti-aliased line pixels included)."""
    x = rgb.astype(int)
    ch = int(np.argmax(colour))
    others = [k for k in range(3) if k != ch]
    return (x[..., ch] - np.maximum(x[..., others[0]], x[..., others[1]])) > 60


def test_outline_lies_on_the_projected_contour_of_a_known_pose():
    from reg2d3d_ros.drr import DRRRenderer

    ct, center = _sphere_ct()
    T, K = _pose(center), _K()
    frame = DRRRenderer.from_volume(ct).render(T, K, SIZE, SIZE).line_integral[0].numpy()
    outline = OutlineOverlay.from_ct(ct, "T8", neighbours=0)
    rgb = overlay_frame(frame, outline, T, K)  # no legend: every green pixel is the outline
    assert rgb.shape == (SIZE, SIZE, 3) and rgb.dtype == np.uint8
    # the sphere projects to a circle about the principal point: radius f r / sqrt(z^2 - r^2)
    rho = F_PX * R_MM / np.sqrt(Z0_MM**2 - R_MM**2)
    v, u = np.nonzero(_outline_pixels(rgb, GREEN))
    c = (SIZE - 1) / 2
    d = np.hypot(u - c, v - c)
    assert len(d) > 2 * np.pi * rho * 0.9  # a connected line, not a scatter of dots
    # voxels of 0.5 x 0.5 x 1 mm: the voxelised sphere's outline is up to 0.7 px outside the circle
    assert np.all(np.abs(d - rho) < 2.0), np.abs(d - rho).max()
    assert np.median(np.abs(d - rho)) < 0.8
    # and the whole circle is drawn: every direction has outline pixels
    angles = np.degrees(np.arctan2(v - c, u - c)) % 360
    assert len(np.unique(np.floor(angles / 5))) == 72
    # the polylines are closed contours of the silhouette, without gaps
    lines = outline.outlines(outline.target, T, K, SIZE, SIZE)
    assert len(lines) == 1 and lines[0][1] and len(lines[0][0]) > 2 * np.pi * rho * 0.9
    # the frame under the lines stays grey
    grey = ~_outline_pixels(rgb, GREEN) & ~_outline_pixels(rgb, (0, 255, 0))
    far = np.abs(np.hypot(*np.meshgrid(np.arange(SIZE) - c, np.arange(SIZE) - c)) - rho) > 4
    x = rgb[far & grey].astype(int)
    assert np.all(x[:, 0] == x[:, 1]) and np.all(x[:, 1] == x[:, 2])


def test_a_structure_cut_by_the_volume_is_not_outlined_along_the_cut():
    ct, center = _sphere_ct(with_neighbour=True)
    T, K = _pose(center), _K()
    outline = OutlineOverlay.from_ct(ct, "T8", neighbours=1)
    assert [layer.name for layer in outline.layers] == ["T7", "T8"]
    t7 = outline.layers[0]
    assert len(t7.cut_pts_ct_mm) > 0 and len(outline.target.cut_pts_ct_mm) == 0
    lines = outline.outlines(t7, T, K, SIZE, SIZE)
    assert lines and not any(closed for _, closed in lines)  # open: the cut is left out
    # no drawn point lies where the cut face projects
    from reg2d3d_ros.viz import _pose_np, _project

    cut_uv, _ = _project(t7.cut_pts_ct_mm, _pose_np(T), _pose_np(K))
    drawn = np.concatenate([p[:, 0] for p, _ in lines]).astype(float)
    dist = np.min(np.linalg.norm(drawn[:, None, :] - cut_uv[None, ::7, :], axis=-1), axis=1)
    assert dist.min() > 1.0


def test_contrast_normalisation_legend_and_refused_marking():
    rng = np.random.default_rng(0)
    # a dark, low-contrast frame with a bright shutter at the border
    img = 0.1 + 0.01 * rng.random((128, 128)).astype(np.float32)
    img[:, :10] = 5.0
    u8 = contrast_normalise(img)
    centre = u8[32:96, 32:96]
    assert u8.dtype == np.uint8 and centre.std() > 30  # the shutter does not set the window
    rgb = overlay_frame(img, legend=legend_lines("lost", 0.21, 43.0, "T8", "no pose: tracking lost"), refused=True)
    assert rgb.shape == (128, 128, 3)
    border = rgb[0, :, :].astype(int)
    assert np.all(border[:, 0] > 200) and np.all(border[:, 1] < 100)  # a red frame: no pose for this frame
    box = rgb[3:30, 3:60].astype(int)
    assert (box[..., 0] - box[..., 1] > 100).sum() > 10  # the state in red ("lost")
    assert ((box.min(axis=-1) > 180)).sum() > 10  # the confidence / latency text


@pytest.mark.parametrize("size", [256, 512])
def test_overlay_is_cheap(size):
    import time

    ct, center = _sphere_ct()
    T, K = _pose(center), _K()
    K[:2] *= size / SIZE
    outline = OutlineOverlay.from_ct(ct, "T8", neighbours=0)
    frame = np.random.default_rng(0).random((size, size)).astype(np.float32)
    overlay_frame(frame, outline, T, K, legend_lines("tracking", 0.9, 40.0, "T8"))
    t0 = time.perf_counter()
    for _ in range(5):
        overlay_frame(frame, outline, T, K, legend_lines("tracking", 0.9, 40.0, "T8"))
    # a few ms on one free core (98k projected corners here, a vertebra has about 19k); loose for loaded machines
    assert (time.perf_counter() - t0) / 5 < 0.25
