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
    """
    from scipy import ndimage

    if low <= 0 or high < low:
        raise ConfigError(f"need 0 < low <= high, got low={low}, high={high}")
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


def structure_region(ct, label_ids, dilation_mm: float = 3.0) -> np.ndarray:
    """Boolean ``(D, H, W)`` region: the labels dilated by about ``dilation_mm`` (ellipsoidal in voxels)."""
    from scipy import ndimage

    mask = ct.label_mask(label_ids)
    r = np.maximum(np.round(dilation_mm / ct.spacing_mm[::-1]).astype(int), 0)  # (k, j, i)
    if not np.any(r):
        return mask
    zz, yy, xx = np.meshgrid(*[np.arange(-ri, ri + 1) for ri in r], indexing="ij")
    ball = ((zz / max(r[0], 1)) ** 2 + (yy / max(r[1], 1)) ** 2 + (xx / max(r[2], 1)) ** 2) <= 1.0
    return ndimage.binary_dilation(mask, structure=ball)
