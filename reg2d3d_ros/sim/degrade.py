"""X-ray image formation and degradations applied to DRR line integrals.

Model (per frame, all images ``(H, W)`` float):

1. primary photons ``N_p = I0 exp(-L)`` from the line integral ``L`` (dimensionless);
2. scatter: a smooth (heavily blurred) ``scatter_fraction`` of the primary fluence is added;
3. quantum noise: ``N ~ Poisson(N_p + N_s)`` (skipped when ``photons_per_pixel`` is None);
4. detector blur: Gaussian, ``blur_sigma_px``;
5. display: ``transmission`` keeps counts (bright = more photons); ``attenuation`` is the
   log-converted, inverted image ``-log(N / I0)`` (bright = more material);
6. intensity scaling: gain and offset (drawn once per sequence), then quantisation to the
   encoding (``mono16``: 0..65535, ``mono8``: 0..255, ``32FC1``: float).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter

from ..errors import ConfigError
from ..images import ENCODINGS, INTENSITIES

#: Display scale: attenuation value ``L`` maps to ``L * ATTENUATION_SCALE[encoding]`` before gain.
ATTENUATION_SCALE = {"mono16": 6000.0, "mono8": 24.0, "32FC1": 1.0}
#: Transmission display: ``N / I0`` maps to this times the fraction before gain.
TRANSMISSION_SCALE = {"mono16": 60000.0, "mono8": 240.0, "32FC1": 1.0}


@dataclass
class XrayDegradation:
    """Parameters of :func:`degrade`.

    Attributes
    ----------
    photons_per_pixel : float or None
        Unattenuated photon count per pixel ``I0`` (dose); ``None`` disables quantum noise. The
        default 2e5 corresponds to about 10 uGy entrance air kerma per frame (about 3.5e5
        photons/mm^2 at 60 keV) on a 0.64 mm^2 pixel at the isocentre, a typical fluoroscopy
        frame; behind the mediastinum (line integral about 5.5) about 800 photons remain.
    scatter_fraction : float
        Scatter as a fraction of the mean primary fluence (0 disables).
    blur_sigma_px : float
        Detector blur (Gaussian sigma), pixels.
    gain : float
        Multiplicative intensity scaling applied after the display mapping.
    offset : float
        Additive offset (in encoded units) applied after the gain.
    display : str
        ``attenuation`` or ``transmission``.
    encoding : str
        ``mono16``, ``mono8`` or ``32FC1``.
    """

    photons_per_pixel: float | None = 2.0e5
    scatter_fraction: float = 0.05
    blur_sigma_px: float = 0.7
    gain: float = 1.0
    offset: float = 0.0
    display: str = "attenuation"
    encoding: str = "mono16"

    def __post_init__(self):
        if self.display not in INTENSITIES:
            raise ConfigError(f"display must be one of {INTENSITIES}, got {self.display!r}")
        if self.encoding not in ENCODINGS:
            raise ConfigError(f"encoding must be one of {sorted(ENCODINGS)}, got {self.encoding!r}")
        if self.photons_per_pixel is not None and self.photons_per_pixel <= 0:
            raise ConfigError("photons_per_pixel must be positive or None")
        if self.scatter_fraction < 0 or self.blur_sigma_px < 0 or self.gain <= 0:
            raise ConfigError("scatter_fraction and blur_sigma_px must be >= 0 and gain > 0")

    @classmethod
    def clean(cls, display: str = "attenuation", encoding: str = "32FC1") -> "XrayDegradation":
        """No noise, scatter or blur: the display-mapped DRR itself."""
        return cls(photons_per_pixel=None, scatter_fraction=0.0, blur_sigma_px=0.0, display=display, encoding=encoding)


def degrade(line_integral: np.ndarray, params: XrayDegradation, rng: np.random.Generator) -> np.ndarray:
    """Turn a DRR line-integral image into a simulated detector frame.

    Parameters
    ----------
    line_integral : np.ndarray
        ``(H, W)`` line integrals (dimensionless, >= 0).
    params : XrayDegradation
        Degradation parameters.
    rng : np.random.Generator
        Source of noise.

    Returns
    -------
    np.ndarray
        ``(H, W)`` frame in the encoding's dtype (uint8, uint16 or float32).
    """
    L = np.asarray(line_integral, dtype=np.float64)
    I0 = params.photons_per_pixel if params.photons_per_pixel is not None else 1.0e4
    primary = I0 * np.exp(-L)
    counts = primary
    if params.scatter_fraction > 0:
        sigma = max(L.shape) / 8.0
        counts = counts + params.scatter_fraction * gaussian_filter(primary, sigma, mode="nearest")
    if params.photons_per_pixel is not None:
        counts = rng.poisson(counts).astype(np.float64)
    if params.blur_sigma_px > 0:
        counts = gaussian_filter(counts, params.blur_sigma_px, mode="nearest")
    enc = params.encoding
    if params.display == "attenuation":
        value = -np.log(np.clip(counts, 0.5, None) / I0) * ATTENUATION_SCALE[enc]
    else:
        value = counts / I0 * TRANSMISSION_SCALE[enc]
    value = value * params.gain + params.offset
    if enc == "32FC1":
        return value.astype(np.float32)
    hi = 65535 if enc == "mono16" else 255
    return np.clip(np.rint(value), 0, hi).astype(np.uint16 if enc == "mono16" else np.uint8)
