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

Steps 2-6 are also functions (:func:`add_scatter`, :func:`detect`, :func:`display_values`,
:func:`quantise`) that the domain-randomised simulator (:mod:`.randomize`) shares.
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
    counts = add_scatter(primary, params.scatter_fraction, max(L.shape) / 8.0)
    counts = detect(counts, rng, noise=params.photons_per_pixel is not None, blur_sigma_px=params.blur_sigma_px)
    enc = params.encoding
    scale = ATTENUATION_SCALE[enc] if params.display == "attenuation" else TRANSMISSION_SCALE[enc]
    value = display_values(counts, I0, params.display) * scale
    value = value * params.gain + params.offset
    return quantise(value, enc)


# -- image-formation steps shared with :mod:`.randomize` ------------------------------------


def add_scatter(primary: np.ndarray, scatter_fraction: float, sigma_px: float, downsample: int = 1, source_weight=None) -> np.ndarray:
    """Primary fluence plus scatter, ``primary + scatter_fraction * G_sigma(primary * source_weight)``.

    Parameters
    ----------
    primary : np.ndarray
        ``(H, W)`` float32 or float64 primary photons per pixel.
    scatter_fraction : float
        Scatter as a fraction of the (locally averaged) primary fluence; 0 returns ``primary``.
    sigma_px : float
        Width (Gaussian sigma) of the scatter kernel, pixels.
    downsample : int
        1: exact Gaussian at full resolution (what :func:`degrade` uses). ``k > 1``: the
        kernel is applied to ``k x k`` block means and the result is linearly interpolated
        back, about ``k^2`` times cheaper; the difference is far below the noise because the
        scatter field is smooth on the scale of ``sigma_px >> k``.
    source_weight : np.ndarray, optional
        ``(H, W)`` dimensionless weight of each pixel's primary as a scatter source (e.g. the
        line integral, so that unattenuated rays past the patient scatter nothing); default 1.

    Returns
    -------
    np.ndarray
        ``(H, W)`` expected photons per pixel, dtype of ``primary``.
    """
    if scatter_fraction <= 0:
        return primary
    source = primary if source_weight is None else primary * source_weight
    if downsample <= 1:
        return primary + scatter_fraction * gaussian_filter(source, sigma_px, mode="nearest")
    k = int(downsample)
    H, W = primary.shape
    h, w = -(-H // k), -(-W // k)
    padded = np.pad(source, ((0, h * k - H), (0, w * k - W)), mode="edge")
    small = padded.reshape(h, k, w, k).mean(axis=(1, 3))
    small = gaussian_filter(small, sigma_px / k, mode="nearest")
    Ry, Rx = (_upsample_matrix(n, m, k).astype(primary.dtype, copy=False) for n, m in ((H, h), (W, w)))
    return primary + scatter_fraction * (Ry @ small @ Rx.T)


def _upsample_matrix(n: int, m: int, k: int) -> np.ndarray:
    """``(n, m)`` linear interpolation from ``m`` block centres (blocks of ``k`` pixels) to ``n`` pixels."""
    key = (n, m, k)
    if key not in _UPSAMPLE_CACHE:
        pos = (np.arange(n) + 0.5) / k - 0.5  # pixel centre in block-index units
        pos = np.clip(pos, 0.0, m - 1.0)
        i0 = np.floor(pos).astype(int)
        i1 = np.minimum(i0 + 1, m - 1)
        f = pos - i0
        R = np.zeros((n, m))
        R[np.arange(n), i0] += 1.0 - f
        R[np.arange(n), i1] += f
        _UPSAMPLE_CACHE[key] = R
    return _UPSAMPLE_CACHE[key]


_UPSAMPLE_CACHE: dict = {}


def detect(expected: np.ndarray, rng: np.random.Generator, noise: bool, blur_sigma_px: float) -> np.ndarray:
    """Detector: Poisson quantum noise on the expected counts, then Gaussian blur.

    Parameters
    ----------
    expected : np.ndarray
        ``(H, W)`` float32 or float64 expected photons per pixel.
    rng : np.random.Generator
        Source of the noise.
    noise : bool
        Draw ``Poisson(expected)`` (False: keep the expected counts).
    blur_sigma_px : float
        Detector blur (Gaussian sigma), pixels; 0 disables.

    Returns
    -------
    np.ndarray
        ``(H, W)`` counts, dtype of ``expected``.
    """
    counts = expected
    if noise:
        counts = rng.poisson(counts).astype(expected.dtype)
    if blur_sigma_px > 0:
        counts = gaussian_filter(counts, blur_sigma_px, mode="nearest")
    return counts


def display_values(counts: np.ndarray, photons_ref: float, display: str) -> np.ndarray:
    """Display mapping of detector counts (before any scaling).

    Parameters
    ----------
    counts : np.ndarray
        ``(H, W)`` photons per pixel.
    photons_ref : float
        Unattenuated photons per pixel ``I0`` (the flat-field level).
    display : str
        ``attenuation``: ``-log(max(N, 0.5) / I0)`` (dimensionless line integral, bright = more
        material); ``transmission``: ``N / I0`` (fraction, bright = more photons).

    Returns
    -------
    np.ndarray
        ``(H, W)`` values, dtype of ``counts``.
    """
    if display == "attenuation":
        return -np.log(np.clip(counts, 0.5, None) / photons_ref)
    return counts / photons_ref


def quantise(value: np.ndarray, encoding: str, max_value: int | None = None) -> np.ndarray:
    """Round and clip to the encoding: ``32FC1`` float32 as is, else integers ``0..max_value``.

    Parameters
    ----------
    value : np.ndarray
        ``(H, W)`` values in encoded units.
    encoding : str
        ``mono8``, ``mono16`` or ``32FC1``.
    max_value : int, optional
        Largest code (e.g. 4095 for 12-bit data in ``mono16``); default: the container's.

    Returns
    -------
    np.ndarray
        ``(H, W)`` uint8, uint16 or float32.
    """
    if encoding == "32FC1":
        return value.astype(np.float32)
    hi = (65535 if encoding == "mono16" else 255) if max_value is None else max_value
    return np.clip(np.rint(value), 0, hi).astype(np.uint16 if encoding == "mono16" else np.uint8)
