"""Bone surface points of a CT by 3-D Canny edge detection (conventions: :mod:`reg2d3d_ros.geometry`).

Steps (Wang et al., TMI 2017, section on the initialisation):

1. smooth the HU volume with a Gaussian of ``sigma_mm`` (per-axis sigma in voxels from the
   spacing, so anisotropic voxels are smoothed isotropically in mm);
2. physical gradient (HU/mm) in the CT frame (through the direction cosines);
3. non-maximum suppression along the gradient direction (trilinear samples at +-``nms_step``
   voxels), with sub-voxel refinement of the edge position by a parabola through the three
   magnitudes;
4. hysteresis: keep local maxima above ``high`` HU/mm and those above ``low`` that are
   26-connected to them;
5. optionally restrict to a region (e.g. the target vertebra's label dilated by a margin).

A coarse CT (a 3 mm abdominal series) gives few, weak edges on its own grid: sampled on a finer
grid (``upsample``) with thresholds lowered for its blur, it gives about as many points, as close
to the bone surface, as a 0.7 mm CT (:func:`surface_sampling` chooses both from the voxel size).

The result is a :class:`SurfacePoints`: positions ``w`` (CT mm), unit gradients ``g`` (pointing
towards higher HU, i.e. into bone) and gradient magnitudes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError, ModelLoadError


@dataclass
class SurfacePoints:
    """Surface points of a structure.

    Attributes
    ----------
    pts_ct_mm : np.ndarray
        ``(N, 3)`` float64 positions, CT frame, mm.
    normals_ct : np.ndarray
        ``(N, 3)`` float64 unit gradient directions (towards higher HU), CT frame.
    magnitude : np.ndarray
        ``(N,)`` float64 gradient magnitude of the smoothed volume, HU/mm.
    """

    pts_ct_mm: np.ndarray
    normals_ct: np.ndarray
    magnitude: np.ndarray

    def __len__(self) -> int:
        return len(self.pts_ct_mm)

    def subset(self, idx) -> "SurfacePoints":
        """The points at ``idx``."""
        return SurfacePoints(self.pts_ct_mm[idx], self.normals_ct[idx], self.magnitude[idx])

    def save(self, path) -> None:
        """Save as ``.npz`` (no pickling)."""
        np.savez_compressed(path, pts_ct_mm=self.pts_ct_mm, normals_ct=self.normals_ct, magnitude=self.magnitude)

    @classmethod
    def load(cls, path) -> "SurfacePoints":
        """Load from ``.npz`` written by :meth:`save` (``allow_pickle=False``)."""
        try:
            with np.load(Path(path), allow_pickle=False) as z:
                sp = cls(z["pts_ct_mm"].astype(np.float64), z["normals_ct"].astype(np.float64), z["magnitude"].astype(np.float64))
        except (OSError, ValueError, KeyError) as exc:
            raise ModelLoadError(f"cannot read surface points {path}: {exc}") from None
        if sp.pts_ct_mm.ndim != 2 or sp.pts_ct_mm.shape[1] != 3 or sp.normals_ct.shape != sp.pts_ct_mm.shape:
            raise ModelLoadError(f"surface points file {path} has inconsistent arrays")
        return sp


def canny_surface_points(
    ct,
    sigma_mm: float = 1.5,
    low: float = 60.0,
    high: float = 150.0,
    region: np.ndarray | None = None,
    nms_step: float = 0.75,
    max_points: int | None = None,
    seed: int = 0,
    upsample: tuple | None = None,
) -> SurfacePoints:
    """3-D Canny surface points of a CT (typically a crop around one vertebra).

    Parameters
    ----------
    ct : CTVolume
        The volume (HU).
    sigma_mm : float
        Gaussian smoothing, mm.
    low, high : float
        Hysteresis thresholds on the gradient magnitude, HU/mm.
    region : np.ndarray, optional
        ``(D, H, W)`` bool: keep only edges inside it (e.g. a dilated vertebra label).
    nms_step : float
        Offset (voxels, along the unit gradient in index space) of the non-maximum test.
    max_points : int, optional
        Randomly subsample to at most this many points (seeded).
    seed : int
        Seed of the subsampling.
    upsample : tuple of 3 int, optional
        Factors ``(i, j, k)``: detect the edges on a grid this many times finer along each axis
        (HU trilinear, region nearest neighbour; see :func:`surface_sampling`). None: the CT's grid.
    """
    from scipy import ndimage

    if low <= 0 or high < low:
        raise ConfigError(f"need 0 < low <= high, got low={low}, high={high}")
    if upsample is not None and any(int(u) != 1 for u in upsample):
        ct, region = _upsampled(ct, region, upsample)
    spacing = ct.spacing_mm  # (i, j, k)
    sig_vox = [sigma_mm / spacing[2], sigma_mm / spacing[1], sigma_mm / spacing[0]]  # array order (k, j, i)
    vol = ndimage.gaussian_filter(ct.hu.astype(np.float64), sigma=sig_vox, mode="nearest")
    # gradient per voxel index along (k, j, i) -> d/di, d/dj, d/dk
    gk, gj, gi = np.gradient(vol)
    g_idx = np.stack([gi, gj, gk], axis=-1)  # (D, H, W, 3): dHU / d(index)
    # chain rule: dHU/dx_ct = A^{-T} dHU/d(index) with A = T_ct_from_ijk[:3, :3]
    A_inv_T = np.linalg.inv(ct.T_ct_from_ijk[:3, :3]).T
    g_ct = g_idx @ A_inv_T.T
    mag = np.linalg.norm(g_ct, axis=-1)
    cand = mag > low
    if region is not None:
        if region.shape != ct.hu.shape:
            raise ConfigError(f"region shape {region.shape} differs from CT shape {ct.hu.shape}")
        cand &= region
    kji = np.argwhere(cand)
    if len(kji) == 0:
        raise ConfigError("no edges above the low threshold: check the thresholds or the region")
    # unit gradient direction in index space for the non-maximum test
    d_idx = g_idx[cand]
    d_idx = d_idx / np.maximum(np.linalg.norm(d_idx, axis=-1, keepdims=True), 1e-12)
    ijk = kji[:, ::-1].astype(np.float64)
    m0 = mag[cand]

    def sample(pts_ijk):
        coords = np.stack([pts_ijk[:, 2], pts_ijk[:, 1], pts_ijk[:, 0]])  # (k, j, i)
        return ndimage.map_coordinates(mag, coords, order=1, mode="nearest")

    m_plus = sample(ijk + nms_step * d_idx)
    m_minus = sample(ijk - nms_step * d_idx)
    is_max = (m0 >= m_plus) & (m0 > m_minus)
    # hysteresis among the local maxima
    maxima = np.zeros(ct.hu.shape, dtype=bool)
    maxima[tuple(kji[is_max].T)] = True
    strong = np.zeros_like(maxima)
    strong[tuple(kji[is_max & (m0 > high)].T)] = True
    labels, n = ndimage.label(maxima, structure=np.ones((3, 3, 3), dtype=bool))
    keep_labels = np.unique(labels[strong])
    keep_labels = keep_labels[keep_labels > 0]
    keep = np.isin(labels, keep_labels)
    sel = is_max & keep[tuple(kji.T)]
    # sub-voxel refinement along the gradient: vertex of the parabola through (-s, 0, +s)
    denom = m_plus[sel] - 2 * m0[sel] + m_minus[sel]
    offset = np.where(np.abs(denom) > 1e-12, 0.5 * (m_minus[sel] - m_plus[sel]) / denom, 0.0)
    offset = np.clip(offset, -0.5, 0.5) * nms_step
    ijk_ref = ijk[sel] + offset[:, None] * d_idx[sel]
    pts = ct.ijk_to_ct(ijk_ref)
    normals = g_ct[cand][sel]
    normals = normals / np.maximum(np.linalg.norm(normals, axis=-1, keepdims=True), 1e-12)
    out = SurfacePoints(pts, normals, m0[sel])
    if max_points is not None and len(out) > max_points:
        idx = np.sort(np.random.default_rng(seed).choice(len(out), size=max_points, replace=False))
        out = out.subset(idx)
    return out


#: Voxel volume of the CT the surface thresholds were chosen on (the example CT, 0.703 x 0.703 x 2.5 mm), mm^3.
REFERENCE_VOXEL_MM3 = 0.703125 * 0.703125 * 2.5

#: Fewest contour points a PPC update uses (fewer: no update); the floor of :func:`min_correspondences_at`.
MIN_UPDATE_POINTS = 12


def _upsampled(ct, region, factors):
    """``(ct, region)`` on a grid ``factors = (i, j, k)`` times finer (HU trilinear, region nearest), same physical frame."""
    from dataclasses import replace

    from scipy import ndimage

    u = np.array([max(1, int(f)) for f in factors])
    d, h, w = ct.hu.shape
    axes = [(np.arange(n * f) + 0.5) / f - 0.5 for n, f in zip((w, h, d), u)]  # fine voxel centres in coarse indices (i, j, k)
    K, J, I = np.meshgrid(axes[2], axes[1], axes[0], indexing="ij")
    hu = ndimage.map_coordinates(ct.hu, [K, J, I], order=1, mode="nearest").astype(np.float32)
    if region is not None:
        region = ndimage.map_coordinates(region.astype(np.uint8), [K, J, I], order=0, mode="nearest").astype(bool)
    S = np.diag([1.0 / u[0], 1.0 / u[1], 1.0 / u[2], 1.0])
    S[:3, 3] = 0.5 / u - 0.5
    return replace(ct, hu=hu, T_ct_from_ijk=ct.T_ct_from_ijk @ S, labels=None), region


def surface_sampling(spacing_mm, sigma_mm: float = 1.5, low: float = 60.0, high: float = 150.0) -> dict:
    """Settings of :func:`canny_surface_points` for a CT's voxel size (``{}`` for one as fine as the reference).

    A CT whose voxels are larger than :data:`REFERENCE_VOXEL_MM3` (the example CT's, on which the
    thresholds were chosen) is sampled on a grid of about the reference voxel size (each axis
    upsampled by ``round(spacing / reference edge)``), and the hysteresis thresholds are scaled by
    the drop of an edge's gradient under the CT's blur: ``sigma_eff(reference) / sigma_eff(CT)``
    with ``sigma_eff(s) = sqrt(sigma_mm^2 + (s / 2.355)^2)`` (a point spread of one voxel's
    width at half maximum; ``s`` the geometric mean spacing). On the example CT resampled to
    3 mm this gives 3932 surface points of L3 instead of 278 (0.7 mm CT: 4811), median 0.8 mm from
    the 0.7 mm CT's points, and 249 / 152 contour points in AP / lateral 256-pixel views instead
    of 32 / 16 (0.7 mm CT: 263 / 172).

    Parameters
    ----------
    spacing_mm : array-like
        ``(3,)`` voxel spacing of the CT, mm.
    sigma_mm, low, high : float
        The smoothing and thresholds that apply to a CT as fine as the reference (HU/mm).

    Returns
    -------
    dict
        Keyword arguments for :func:`canny_surface_points` (``upsample``, ``low``, ``high``), e.g.
        ``PPCRegistrator.from_ct(ct, target, surface_kwargs=surface_sampling(ct.spacing_mm))``.
    """
    sp = np.asarray(spacing_mm, dtype=np.float64)
    if sp.shape != (3,) or not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        raise ConfigError(f"voxel spacing must be three positive numbers (mm), got {spacing_mm!r}")
    volume = float(np.prod(sp))
    if volume <= REFERENCE_VOXEL_MM3 * 1.05:
        return {}
    edge_ref = REFERENCE_VOXEL_MM3 ** (1.0 / 3.0)
    upsample = tuple(int(max(1, round(s / edge_ref))) for s in sp)

    def sigma_eff(s):
        return float(np.hypot(sigma_mm, s / 2.355))

    f = sigma_eff(edge_ref) / sigma_eff(volume ** (1.0 / 3.0))
    return {"upsample": upsample, "low": low * f, "high": high * f}


def expected_contour_points(pts_ct_mm, normals_ct, T_optical_from_ct, K, max_cos: float = 0.15, cell_px: float = 1.0) -> int:
    """Contour points a surface gives at a pose on an unbounded detector (:func:`.contours.select_contours` without borders).

    Parameters
    ----------
    pts_ct_mm, normals_ct : torch.Tensor
        ``(M, 3)`` surface points (mm) and unit gradients, CT frame.
    T_optical_from_ct : torch.Tensor
        ``(4, 4)`` pose, mm.
    K : torch.Tensor
        ``(3, 3)`` intrinsics of the image the contours are matched in (pixels).
    max_cos, cell_px : float
        Contour selection settings (as the registration's ``PPCConfig``).
    """
    import torch

    from .contours import select_contours

    T = torch.as_tensor(T_optical_from_ct, dtype=torch.float64)
    K = torch.as_tensor(K, dtype=torch.float64)
    pts = torch.as_tensor(pts_ct_mm, dtype=torch.float64)
    w = pts @ T[:3, :3].T + T[:3, 3]
    front = w[:, 2] > 1.0
    if not bool(front.any()):
        return 0
    q = w[front] @ K.T
    uv = q[:, :2] / q[:, 2:3]
    lo = torch.floor(uv.min(dim=0).values) - 4.0
    hi = torch.ceil(uv.max(dim=0).values) + 4.0
    K2 = K.clone()
    K2[0, 2] -= float(lo[0])
    K2[1, 2] -= float(lo[1])
    width, height = int(hi[0] - lo[0]) + 1, int(hi[1] - lo[1]) + 1
    c = select_contours(pts, torch.as_tensor(normals_ct, dtype=torch.float64), T, K2, height, width, max_cos=max_cos, cell_px=cell_px,
                        margin_px=0.0)
    return len(c)


def min_correspondences_at(pts_ct_mm, normals_ct, T_optical_from_ct, K, minimum: int = 30, fraction: float = 0.3,
                           max_cos: float = 0.15, cell_px: float = 1.0) -> int:
    """The fewest contour correspondences a registration at this pose may have before it is judged lost.

    ``min(minimum, max(MIN_UPDATE_POINTS, ceil(fraction * expected)))``, where
    ``expected`` is :func:`expected_contour_points` at the pose (what the target can give at this
    CT resolution, view and frame size, wherever the detector's borders are). A fine CT keeps
    ``minimum`` (a vertebra gives 100-400 contour points at 128-512 pixels); a coarse one or a
    small target gets a lower bound it can reach, while a target mostly outside the frame (fewer
    than ``fraction`` of its contour inside) still fails it.

    Parameters
    ----------
    pts_ct_mm, normals_ct, T_optical_from_ct, K
        As :func:`expected_contour_points` (the registrator's ``pts``, ``normals``, the
        registered pose, the frame's ``intrinsics.K()``).
    minimum : int
        The bound for a target that gives plenty of points (``PipelineConfig.min_correspondences``).
    fraction : float
        Fraction of the expected contour points.
    max_cos, cell_px : float
        Contour selection settings of the final level (``PPCConfig``).
    """
    import math

    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"fraction must be in (0, 1], got {fraction}")
    expected = expected_contour_points(pts_ct_mm, normals_ct, T_optical_from_ct, K, max_cos=max_cos, cell_px=cell_px)
    return int(min(int(minimum), max(MIN_UPDATE_POINTS, math.ceil(fraction * expected))))
