"""Attenuation of the simulated X-ray beam from CT numbers.

CT numbers are measured at the CT's effective energy (about 70 keV); fluoroscopy runs at lower
mean energies (about 40-50 keV at 60-80 kVp), where the photoelectric effect raises the
attenuation of bone mineral much more than that of water. A two-component model (water
equivalent plus bone excess) captures this to first order:

    mu(HU) = mu_w (1 + HU / 1000)                         for HU <= 0 (air, fat, water),
    mu(HU) = mu_w (1 + bone_contrast * HU / 1000)         for HU > 0,

``bone_contrast`` being the ratio of the bone excess attenuation (relative to water) at the
fluoroscopy energy to that at the CT energy. From tabulated mass attenuation coefficients
(cortical bone vs water: mu_bone / mu_water - 1 = 1.6 at 70 keV, 3.8 at 40 keV, 2.6 at 50 keV),
values of 1.5-2.4 correspond to mean energies of 50-40 keV; the default 1.8 sits in between.
``bone_contrast = 1`` gives the plain linear model of :meth:`reg2d3d_ros.volume.CTVolume.mu`.
"""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError
from ..volume import MU_WATER_PER_MM

#: Default ratio of bone excess attenuation at fluoroscopy vs CT energy (see module doc).
BONE_CONTRAST = 1.8


def fluoro_attenuation(hu: np.ndarray, bone_contrast: float = BONE_CONTRAST, mu_water_per_mm: float = MU_WATER_PER_MM) -> np.ndarray:
    """Linear attenuation ``(D, H, W)`` float32 (1/mm) seen by the fluoroscope."""
    if bone_contrast <= 0:
        raise ConfigError(f"bone_contrast must be positive, got {bone_contrast}")
    hu = np.asarray(hu, dtype=np.float32)
    mu = mu_water_per_mm * (1.0 + np.minimum(hu, 0.0) / 1000.0 + bone_contrast * np.maximum(hu, 0.0) / 1000.0)
    return np.clip(mu, 0.0, None).astype(np.float32)


def attenuation_components(hu: np.ndarray, mu_water_per_mm: float = MU_WATER_PER_MM) -> tuple:
    """Water-equivalent and bone-excess attenuation, the two terms of the model above.

    ``fluoro_attenuation(hu, c) == mu_water_eq + c * mu_bone_excess`` for every ``c > 0``: the
    clip at 0 only acts below -1000 HU, where the bone term is 0, so it never mixes the two.
    Line integrals of the two volumes therefore combine the same way for any bone contrast.

    Parameters
    ----------
    hu : np.ndarray
        ``(D, H, W)`` Hounsfield units.
    mu_water_per_mm : float
        Attenuation of water, 1/mm.

    Returns
    -------
    mu_water_eq, mu_bone_excess : np.ndarray
        ``(D, H, W)`` float32, 1/mm: ``mu_w (1 + min(HU, 0) / 1000)`` clipped at 0, and
        ``mu_w max(HU, 0) / 1000``.
    """
    hu = np.asarray(hu, dtype=np.float32)
    water = np.clip(mu_water_per_mm * (1.0 + np.minimum(hu, 0.0) / 1000.0), 0.0, None).astype(np.float32)
    bone = (mu_water_per_mm * np.maximum(hu, 0.0) / 1000.0).astype(np.float32)
    return water, bone


def xray_renderer(ct, bone_contrast: float = BONE_CONTRAST, binning: int = 2, device=None):
    """Renderer of the whole CT as the simulated X-rays see it (binned in-plane for speed)."""
    import torch

    from ..drr import DRRRenderer

    vol = ct.binned((binning, binning, 1)) if binning > 1 else ct
    return DRRRenderer(torch.as_tensor(fluoro_attenuation(vol.hu, bone_contrast), device=device), vol.T_ct_from_ijk)
