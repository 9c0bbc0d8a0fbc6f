"""The target's bone in a CT: the region of a labelled structure and the attenuation of the moving image.

Registration renders the target alone (its bone, above :data:`BONE_FLOOR_HU`, tapered at its
dilated label): :func:`structure_region` gives the dilated label, :func:`target_attenuation` the
attenuation volume that the PPC and intensity-based registrations project.
"""

from __future__ import annotations

import numpy as np

from .ct import MU_WATER_PER_MM


#: HU above which a voxel counts as bone for the moving image (soft tissue stays below).
BONE_FLOOR_HU = 150.0


def target_attenuation(roi, region: np.ndarray | None = None, floor_hu: float = BONE_FLOOR_HU, taper_mm: float = 2.0) -> np.ndarray:
    """Attenuation ``(D, H, W)`` float32 (1/mm) of the target's bone only: the moving image.

    ``mu_w * max(HU - floor_hu, 0) / 1000`` keeps bone and drops soft tissue, so the projection
    shows the target's bone edges and not the edges of the crop box. With a ``region`` (e.g. the
    dilated vertebra label) the result is multiplied by the region smoothed with a Gaussian of
    ``taper_mm``, which removes neighbouring bones without creating an artificial edge.
    """
    from scipy import ndimage

    mu = MU_WATER_PER_MM * np.clip(roi.hu - floor_hu, 0.0, None) / 1000.0
    if region is not None:
        sig = taper_mm / roi.spacing_mm[::-1]  # (k, j, i) voxels
        mu = mu * ndimage.gaussian_filter(region.astype(np.float32), sigma=sig, mode="constant")
    return mu.astype(np.float32)


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
