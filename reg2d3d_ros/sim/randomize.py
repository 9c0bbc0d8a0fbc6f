"""Domain-randomised X-ray simulation (strong randomisation in the spirit of SyntheX).

Registration trained or tuned on simulated frames works on real C-arm frames when the
simulation varies every factor that real systems vary (Gao et al., "SyntheX: scaling up
learning-based X-ray image analysis through in silico experiments", Nat Mach Intell 2023).
This module splits the simulation in two:

1. :func:`render_components` ray-casts the CT once per pose into two line integrals, the
   water-equivalent ``L_w`` and the bone-excess ``L_b`` (see :mod:`.physics`), so that any bone
   contrast and effective energy is the cheap linear combination
   ``L = mu_scale * (L_w + bone_contrast * L_b)``;
2. :func:`compose_frame` turns the two components into a detector frame in image space, with
   the parameters of one :class:`DomainDraw` (drawn by :func:`draw_domain` from
   :class:`DomainRanges`) and per-frame quantum noise.

Image formation in :func:`compose_frame` (all images ``(H, W)``)::

    L      = mu_scale * (L_w + bone_contrast * L_b + L_objects) + L_table
    L_eff  = L / (1 + beam_hardening * L)            (= L - b L^2 / (1 + b L), monotone)
    N_p    = I0 * heel(x, y) * shutter(x, y) * exp(-L_eff)
    N      = Poisson(N_p + scatter_fraction * G_sigma(N_p * min(L_eff, 1))), then detector blur
    v      = -log(N / I0)   (attenuation display)   or   (N / I0) ** kappa   (transmission)
    t      = clip((v - P_low) / (P_high - P_low), 0, 1) ** gamma     (window: measuring field)
    out    = quantise((offset + gain * t) * (2^bit_depth - 1))       (32FC1: no quantisation)

Objects of the draw (wires, screws) are defined in the optical frame of a reference view in
image-normalised coordinates and depth, so that they land in the field of view of any C-arm;
they are attached to the patient (CT frame) at the reference pose and move with it.
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch

from ..errors import ConfigError
from ..geometry.camera import CArmIntrinsics
from ..images import ENCODINGS, INTENSITIES
from ..volume import MU_WATER_PER_MM
from . import objects as obj
from .degrade import add_scatter, detect, display_values, quantise
from .physics import attenuation_components
from .scenarios import CArmSetup
from .sequence import DEFAULT_START_NS, SimulatedSequence

#: Collimator (shutter) shapes.
COLLIMATORS = ("none", "rect", "circle")
#: Primary transmission of the lead shutters (what remains outside the open field; scatter from
#: the open field still reaches those pixels).
SHUTTER_TRANSMISSION = 0.02
#: Width of the shutter penumbra and of the table edge, as a fraction of ``max(H, W)``.
EDGE_WIDTH_FRACTION = 0.01
#: Unattenuated photons per pixel used for the display mapping when quantum noise is off.
NOISELESS_PHOTONS = 1.0e4
#: ``bit_depth`` recorded for ``32FC1`` frames (float, not quantised).
FLOAT_BIT_DEPTH = 32


# ---------------------------------------------------------------------------------------------
# components


def render_components(ct, intrinsics: CArmIntrinsics, poses_mm, binning: int = 2, device=None, progress: bool = False) -> np.ndarray:
    """Water-equivalent and bone-excess line integrals of a pose sequence.

    Parameters
    ----------
    ct : CTVolume
        The whole CT (overlapping anatomy included).
    intrinsics : CArmIntrinsics
        The C-arm camera (image size ``H x W``).
    poses_mm : torch.Tensor
        ``(F, 4, 4)`` or ``(4, 4)`` ``T_optical_from_ct``, mm.
    binning : int
        In-plane CT binning for speed, as :func:`.physics.xray_renderer` (1: full resolution).
    device : str or torch.device, optional
        Rendering device.
    progress : bool
        Print progress on stderr.

    Returns
    -------
    np.ndarray
        ``(F, 2, H, W)`` float32 (dimensionless): channel 0 ``L_w``, the line integral of
        ``mu_w (1 + min(HU, 0) / 1000)`` (clipped at 0), channel 1 ``L_b``, that of
        ``mu_w max(HU, 0) / 1000``. ``L_w + c * L_b`` is the image of
        ``xray_renderer(ct, bone_contrast=c, binning=binning)``.
    """
    from ..drr import DRRRenderer

    if int(binning) < 1:
        raise ConfigError(f"binning must be >= 1, got {binning}")
    poses = torch.as_tensor(poses_mm)
    if poses.ndim == 2:
        poses = poses[None]
    if poses.ndim != 3 or poses.shape[1:] != (4, 4):
        raise ConfigError(f"poses_mm must be (F, 4, 4), got shape {tuple(poses.shape)}")
    vol = ct.binned((binning, binning, 1)) if binning > 1 else ct
    K = intrinsics.K(dtype=torch.float64)
    H, W = intrinsics.height, intrinsics.width
    out = np.zeros((len(poses), 2, H, W), dtype=np.float32)
    for c, mu in enumerate(attenuation_components(vol.hu, MU_WATER_PER_MM)):
        renderer = DRRRenderer(torch.as_tensor(mu, device=device), vol.T_ct_from_ijk)
        with torch.no_grad():
            for f in range(len(poses)):
                img = renderer.render(poses[f].to(torch.float64), K, H, W).line_integral[0]
                out[f, c] = img.detach().cpu().numpy()
                if progress:
                    print(f"\r  rendering component {c + 1}/2, frame {f + 1}/{len(poses)}", end="", file=sys.stderr, flush=True)
        del renderer
    if progress:
        print(file=sys.stderr)
    return out


# ---------------------------------------------------------------------------------------------
# ranges and draws


@dataclass(frozen=True)
class DomainRanges:
    """Ranges of the randomised parameters (``(low, high)``, uniform unless said otherwise).

    The defaults span what mobile C-arms and their image chains produce while keeping a
    vertebra visible to a human reader.

    Attributes
    ----------
    bone_contrast : tuple
        Bone excess attenuation at fluoroscopy vs CT energy (:mod:`.physics`): 1.0 is the CT's
        own effective energy (about 70 keV), 1.6 and 2.4 mean energies of 50 and 40 keV, 2.6 a
        slightly softer beam (thin patient at low kVp).
    mu_scale : tuple
        Overall attenuation scale (effective energy): water attenuates 0.23/cm at 50 keV and
        0.18/cm at 80 keV around the nominal 0.2/cm; widened for CT calibration and patient
        size errors.
    beam_hardening : tuple
        ``b`` of ``L_eff = L / (1 + b L)``: 0 is a monochromatic beam; at ``b = 0.06`` a line
        integral of 6 (mediastinum) is compressed by 26 % and one of 1 by 6 %, a strong
        hardening of a polychromatic beam.
    photons_per_pixel : tuple
        Unattenuated photons per pixel, log-uniform 500-50000: 4 to 400 times fewer than the
        nominal frame of :class:`.degrade.XrayDegradation` (2e5), i.e. noisier than most real
        frames on purpose; at 500 about 1 photon remains behind the mediastinum (line
        integral 6), yet the vertebra stays visible after the detector blur.
    scatter_fraction : tuple
        Scatter-to-primary ratio of a uniform patient region, ``S = f G(N_p min(L_eff, 1))``
        (the patient scatters, the unattenuated beam beside it does not, unlike the
        :func:`.degrade.degrade` model): 0 (air gap, grid) to 0.4 (no grid). Behind dense
        structures next to lung the ratio is higher: at 0.4, in the central field of the
        example chest CT, the median is 0.5-1.2 and the 90th percentile 2-6 (AP and lateral
        views). The top of the range veils the spine of lateral chest views at high bone
        contrast and ``mu_scale``; it stays visible in AP views.
    scatter_sigma_fraction : tuple
        Scatter kernel sigma as a fraction of ``max(H, W)``: 6-20 % of the field of view (the
        nominal :func:`.degrade.degrade` uses 12.5 %).
    blur_sigma_px : tuple
        Detector/focal-spot blur sigma, pixels: 0.3 (sharp flat panel) to 1.6 (image
        intensifier, large focal spot at this binning).
    heel_fraction : tuple
        Peak-to-peak linear ramp of the primary fluence across the detector (anode heel
        effect, plus flat-field miscalibration): 0-25 %; direction uniform over 360 deg.
    gain : tuple
        Output gain (fraction of the full scale used by the windowed image).
    offset : tuple
        Output black level, fraction of the full scale.
    window_low_pct, window_high_pct : tuple
        Percentiles mapped to black and white, taken in the measuring field (the central half
        of the image, inside the shutter) as automatic exposure and windowing do: 0-5 % of
        those pixels are clipped at either end (more outside it: skin line, air, shutter).
    transmission_exponent : tuple
        ``kappa`` of transmission displays ``(N / I0) ** kappa``, log-uniform: 1 is the linear
        detector signal, smaller values the logarithmic or power-law companding of image
        chains (``-log`` of such a frame is still ``kappa`` times the attenuation). Linear
        frames of thick anatomy (lateral chest, line integrals up to 7) show the spine in only
        a few grey levels, hence the upper end 1 is rare in a log-uniform draw from 0.15.
    gamma : tuple
        Display gamma, log-uniform (monitor/LUT curves of 0.6-1.6).
    encodings : tuple
        ``(encoding, probability)`` pairs: raw 16-bit DICOM-like frames, 8-bit video grabs and
        float frames from software pipelines.
    mono16_bit_depths : tuple
        Bit depths of ``mono16`` data (10-16 bits in a 16-bit container), chosen uniformly.
    displays : tuple
        ``(display, probability)`` pairs, ``attenuation`` (bone bright) or ``transmission``
        (bone dark: the raw detector signal and many fluoroscopy displays).
    collimators : tuple
        ``(shape, probability)`` pairs of ``none``, ``rect`` (iris-less blade collimator) and
        ``circle`` (image-intensifier field).
    collimator_half_size : tuple
        Half width and half height of a rectangular field, fractions of ``W`` and ``H`` (open
        field 60-96 % of the image, so the centred target stays inside).
    collimator_radius : tuple
        Radius of a circular field, fraction of ``min(H, W)`` (0.5: inscribed circle).
    collimator_center_shift : tuple
        Shift of the field centre, fraction of ``W`` and ``H`` (each axis).
    collimator_angle_deg : tuple
        Rotation of a rectangular field, degrees.
    table_probability : float
        Probability of a table edge crossing the image.
    table_strength : tuple
        Line integral added on the table's side: a carbon-fibre top (1-2 mm aluminium
        equivalent) is about 0.05-0.15; mattress, pads and rails add more.
    table_offset : tuple
        Signed distance of the edge from the image centre, fraction of ``max(H, W) / 2``.
    n_wires, n_screws : tuple
        Inclusive ranges of the number of guide wires and pedicle screws (uniform integers).
    wire_radius_mm : tuple
        Guide/K-wire radius, mm (0.8-2 mm diameter wires).
    screw_length_mm, screw_radius_mm : tuple
        Pedicle screw shaft length and radius, mm.
    object_depth_mm : tuple
        Distance of objects from the source along the principal ray, mm (around the patient
        for source-isocentre distances of 600-800 mm).
    """

    bone_contrast: tuple = (1.0, 2.6)
    mu_scale: tuple = (0.75, 1.25)
    beam_hardening: tuple = (0.0, 0.06)
    photons_per_pixel: tuple = (500.0, 50000.0)
    scatter_fraction: tuple = (0.0, 0.4)
    scatter_sigma_fraction: tuple = (0.06, 0.2)
    blur_sigma_px: tuple = (0.3, 1.6)
    heel_fraction: tuple = (0.0, 0.25)
    gain: tuple = (0.7, 1.0)
    offset: tuple = (0.0, 0.15)
    window_low_pct: tuple = (0.0, 5.0)
    window_high_pct: tuple = (95.0, 100.0)
    transmission_exponent: tuple = (0.15, 1.0)
    gamma: tuple = (0.6, 1.6)
    encodings: tuple = (("mono16", 0.45), ("mono8", 0.35), ("32FC1", 0.2))
    mono16_bit_depths: tuple = (10, 12, 14, 16)
    displays: tuple = (("attenuation", 0.5), ("transmission", 0.5))
    collimators: tuple = (("none", 0.4), ("rect", 0.35), ("circle", 0.25))
    collimator_half_size: tuple = (0.3, 0.48)
    collimator_radius: tuple = (0.35, 0.6)
    collimator_center_shift: tuple = (-0.08, 0.08)
    collimator_angle_deg: tuple = (-15.0, 15.0)
    table_probability: float = 0.5
    table_strength: tuple = (0.05, 0.4)
    table_offset: tuple = (-0.9, 0.9)
    n_wires: tuple = (0, 2)
    n_screws: tuple = (0, 2)
    wire_radius_mm: tuple = (0.4, 1.0)
    screw_length_mm: tuple = (30.0, 50.0)
    screw_radius_mm: tuple = (2.0, 3.5)
    object_depth_mm: tuple = (550.0, 800.0)

    def __post_init__(self):
        choices = ("encodings", "mono16_bit_depths", "displays", "collimators", "table_probability")
        for f in fields(self):
            lo_hi = getattr(self, f.name)
            if f.name not in choices and (not isinstance(lo_hi, (tuple, list)) or len(lo_hi) != 2 or not lo_hi[0] <= lo_hi[1]):
                raise ConfigError(f"DomainRanges.{f.name} must be (low, high) with low <= high, got {lo_hi}")
        positive = (
            "bone_contrast", "mu_scale", "photons_per_pixel", "gain", "gamma", "transmission_exponent", "scatter_sigma_fraction",
            "wire_radius_mm", "screw_length_mm", "screw_radius_mm", "object_depth_mm", "collimator_half_size", "collimator_radius",
        )  # fmt: skip
        for name in positive:
            if getattr(self, name)[0] <= 0:
                raise ConfigError(f"DomainRanges.{name} must be positive, got {getattr(self, name)}")
        for name in ("beam_hardening", "scatter_fraction", "blur_sigma_px", "heel_fraction", "n_wires", "n_screws"):
            if getattr(self, name)[0] < 0:
                raise ConfigError(f"DomainRanges.{name} must be >= 0, got {getattr(self, name)}")
        if self.heel_fraction[1] >= 1.0:
            raise ConfigError(f"DomainRanges.heel_fraction must stay below 1, got {self.heel_fraction}")
        if not (0.0 <= self.window_low_pct[0] and self.window_low_pct[1] < self.window_high_pct[0] and self.window_high_pct[1] <= 100.0):
            raise ConfigError("DomainRanges: window percentiles must satisfy 0 <= low < high <= 100")
        for name, allowed in (("encodings", tuple(ENCODINGS)), ("displays", INTENSITIES), ("collimators", COLLIMATORS)):
            pairs = getattr(self, name)
            if not pairs or any(k not in allowed or p < 0 for k, p in pairs) or sum(p for _, p in pairs) <= 0:
                raise ConfigError(f"DomainRanges.{name} must be (name, probability) pairs of {allowed}, got {pairs}")
        if not self.mono16_bit_depths or any(not 9 <= int(b) <= 16 for b in self.mono16_bit_depths):
            raise ConfigError(f"DomainRanges.mono16_bit_depths must lie in 9..16, got {self.mono16_bit_depths}")
        if not 0.0 <= self.table_probability <= 1.0:
            raise ConfigError(f"DomainRanges.table_probability must be in [0, 1], got {self.table_probability}")


@dataclass
class DomainDraw:
    """One draw of the domain parameters (fixed for a sequence; ``asdict`` is JSON-ready).

    The defaults are a nominal, undistorted system (no noise, scatter, heel, shutter, table
    or objects; 16-bit attenuation frames). See :class:`DomainRanges` for the meaning and the
    ranges of the fields.

    Attributes
    ----------
    seed : int
        Seed the parameters were drawn from (:func:`domain_from_seed` reproduces the draw);
        it does not enter the image.
    bone_contrast, mu_scale, beam_hardening : float
        Attenuation model (dimensionless).
    photons_per_pixel : float or None
        Unattenuated photons per pixel; ``None`` disables quantum noise.
    scatter_fraction, scatter_sigma_fraction : float
        Scatter amount and kernel sigma (fraction of ``max(H, W)``).
    blur_sigma_px : float
        Detector blur sigma, pixels.
    heel_fraction, heel_angle_deg : float
        Peak-to-peak fluence ramp and the direction it rises towards (0 deg: +x, 90 deg: +y).
    gain, offset : float
        Output gain and black level, fractions of the full scale.
    window_low_pct, window_high_pct : float
        Window percentiles (in the measuring field: central half of the image, open field).
    transmission_exponent : float
        ``kappa`` of transmission displays (unused for attenuation displays).
    gamma : float
        Display gamma.
    encoding : str
        ``mono8``, ``mono16`` or ``32FC1``.
    bit_depth : int
        Bits of the data: 8 for ``mono8``, 9-16 for ``mono16``, 32 for ``32FC1``.
    display : str
        ``attenuation`` or ``transmission``.
    collimator : str
        ``none``, ``rect`` or ``circle``.
    collimator_half_width, collimator_half_height : float
        Rectangular field half sizes, fractions of ``W`` and ``H``.
    collimator_radius : float
        Circular field radius, fraction of ``min(H, W)``.
    collimator_dx, collimator_dy : float
        Field centre shift, fractions of ``W`` and ``H``.
    collimator_angle_deg : float
        Rotation of the rectangular field, degrees.
    table_strength : float
        Line integral added beyond the table edge (0: no table).
    table_angle_deg : float
        Direction of the edge normal pointing into the table, degrees.
    table_offset : float
        Signed distance of the edge from the image centre along that normal, fraction of
        ``max(H, W) / 2``.
    wires : list of dict
        ``{"points_uvz": [[u, v, z_mm], ...], "radius_mm": r}``: polyline with ``u, v`` the
        image position relative to the centre in fractions of ``W`` and ``H`` and ``z_mm`` the
        depth from the source, in the reference view.
    screws : list of dict
        ``{"tip_uvz": [u, v, z_mm], "direction": [dx, dy, dz], "length_mm": l, "radius_mm": r}``
        (direction: unit vector in the reference view's optical frame).
    """

    seed: int = 0
    bone_contrast: float = 1.8
    mu_scale: float = 1.0
    beam_hardening: float = 0.0
    photons_per_pixel: float | None = None
    scatter_fraction: float = 0.0
    scatter_sigma_fraction: float = 0.125
    blur_sigma_px: float = 0.0
    heel_fraction: float = 0.0
    heel_angle_deg: float = 0.0
    gain: float = 1.0
    offset: float = 0.0
    window_low_pct: float = 0.0
    window_high_pct: float = 100.0
    transmission_exponent: float = 1.0
    gamma: float = 1.0
    encoding: str = "mono16"
    bit_depth: int = 16
    display: str = "attenuation"
    collimator: str = "none"
    collimator_half_width: float = 0.45
    collimator_half_height: float = 0.45
    collimator_radius: float = 0.5
    collimator_dx: float = 0.0
    collimator_dy: float = 0.0
    collimator_angle_deg: float = 0.0
    table_strength: float = 0.0
    table_angle_deg: float = 0.0
    table_offset: float = 0.0
    wires: list = field(default_factory=list)
    screws: list = field(default_factory=list)

    def __post_init__(self):
        if self.encoding not in ENCODINGS:
            raise ConfigError(f"encoding must be one of {sorted(ENCODINGS)}, got {self.encoding!r}")
        if self.display not in INTENSITIES:
            raise ConfigError(f"display must be one of {INTENSITIES}, got {self.display!r}")
        if self.collimator not in COLLIMATORS:
            raise ConfigError(f"collimator must be one of {COLLIMATORS}, got {self.collimator!r}")
        depth_ok = {"mono8": self.bit_depth == 8, "mono16": 9 <= self.bit_depth <= 16, "32FC1": self.bit_depth == FLOAT_BIT_DEPTH}
        if not depth_ok[self.encoding]:
            raise ConfigError(f"bit_depth {self.bit_depth} does not fit {self.encoding} (mono8: 8, mono16: 9-16, 32FC1: 32)")
        if self.photons_per_pixel is not None and not self.photons_per_pixel > 0:
            raise ConfigError(f"photons_per_pixel must be positive or None, got {self.photons_per_pixel}")
        positive = ("bone_contrast", "mu_scale", "gain", "gamma", "transmission_exponent", "scatter_sigma_fraction")
        if not all(getattr(self, k) > 0 for k in positive):
            raise ConfigError(f"{', '.join(positive)} must be positive")
        if min(self.beam_hardening, self.scatter_fraction, self.blur_sigma_px, self.table_strength) < 0:
            raise ConfigError("beam_hardening, scatter_fraction, blur_sigma_px and table_strength must be >= 0")
        if not 0.0 <= self.heel_fraction < 1.0:
            raise ConfigError(f"heel_fraction must be in [0, 1), got {self.heel_fraction}")
        if not 0.0 <= self.window_low_pct < self.window_high_pct <= 100.0:
            raise ConfigError(f"window percentiles must satisfy 0 <= low < high <= 100, got {self.window_low_pct}, {self.window_high_pct}")
        if min(self.collimator_half_width, self.collimator_half_height, self.collimator_radius) <= 0:
            raise ConfigError("collimator sizes must be positive")
        for w in self.wires:
            if not isinstance(w, dict) or len(w.get("points_uvz", ())) < 2 or not w.get("radius_mm", 0) > 0:
                raise ConfigError(f"a wire is a dict with >= 2 points_uvz and a positive radius_mm, got {w}")
        for s in self.screws:
            ok = isinstance(s, dict) and len(s.get("tip_uvz", ())) == 3 and len(s.get("direction", ())) == 3
            if not (ok and s.get("length_mm", 0) > 0 and s.get("radius_mm", 0) > 0 and np.linalg.norm(s["direction"]) > 0):
                raise ConfigError(f"a screw is a dict with tip_uvz, a non-zero direction, positive length_mm and radius_mm, got {s}")

    @property
    def max_code(self) -> float:
        """Full-scale value: ``2^bit_depth - 1`` for integer encodings, 1.0 for ``32FC1``."""
        return 1.0 if self.encoding == "32FC1" else float(2**self.bit_depth - 1)


def _choice(rng: np.random.Generator, pairs) -> str:
    names = [k for k, _ in pairs]
    p = np.array([p for _, p in pairs], dtype=np.float64)
    return names[int(rng.choice(len(names), p=p / p.sum()))]


def domain_from_seed(seed: int, ranges: DomainRanges = DomainRanges()) -> DomainDraw:
    """The draw of ``seed`` (the same parameters every time; ``draw.seed == seed``).

    Parameters
    ----------
    seed : int
        Non-negative seed.
    ranges : DomainRanges
        Parameter ranges.
    """
    seed = int(seed)
    if seed < 0:
        raise ConfigError(f"seed must be >= 0, got {seed}")
    rng = np.random.default_rng(seed)

    def uni(lo_hi) -> float:
        return float(rng.uniform(lo_hi[0], lo_hi[1]))

    def log_uni(lo_hi) -> float:
        return float(math.exp(rng.uniform(math.log(lo_hi[0]), math.log(lo_hi[1]))))

    def integer(lo_hi) -> int:
        return int(rng.integers(lo_hi[0], lo_hi[1] + 1))

    encoding = _choice(rng, ranges.encodings)
    bits = {"mono8": 8, "32FC1": FLOAT_BIT_DEPTH}.get(encoding) or int(rng.choice(np.asarray(ranges.mono16_bit_depths)))
    d = dict(
        seed=seed,
        bone_contrast=uni(ranges.bone_contrast),
        mu_scale=uni(ranges.mu_scale),
        beam_hardening=uni(ranges.beam_hardening),
        photons_per_pixel=log_uni(ranges.photons_per_pixel),
        scatter_fraction=uni(ranges.scatter_fraction),
        scatter_sigma_fraction=uni(ranges.scatter_sigma_fraction),
        blur_sigma_px=uni(ranges.blur_sigma_px),
        heel_fraction=uni(ranges.heel_fraction),
        heel_angle_deg=uni((0.0, 360.0)),
        gain=uni(ranges.gain),
        offset=uni(ranges.offset),
        window_low_pct=uni(ranges.window_low_pct),
        window_high_pct=uni(ranges.window_high_pct),
        transmission_exponent=log_uni(ranges.transmission_exponent),
        gamma=log_uni(ranges.gamma),
        encoding=encoding,
        bit_depth=int(bits),
        display=_choice(rng, ranges.displays),
        collimator=_choice(rng, ranges.collimators),
        collimator_half_width=uni(ranges.collimator_half_size),
        collimator_half_height=uni(ranges.collimator_half_size),
        collimator_radius=uni(ranges.collimator_radius),
        collimator_dx=uni(ranges.collimator_center_shift),
        collimator_dy=uni(ranges.collimator_center_shift),
        collimator_angle_deg=uni(ranges.collimator_angle_deg),
    )
    table = bool(rng.uniform() < ranges.table_probability)
    strength = uni(ranges.table_strength)
    d.update(table_strength=strength if table else 0.0, table_angle_deg=uni((0.0, 360.0)), table_offset=uni(ranges.table_offset))
    wires = []
    for _ in range(integer(ranges.n_wires)):
        # a gently curved wire through a point of the central field, crossing most of the image
        centre = rng.uniform(-0.35, 0.35, size=2)
        a = rng.uniform(0.0, math.pi)
        along, across = np.array([math.cos(a), math.sin(a)]), np.array([-math.sin(a), math.cos(a)])
        length, bend = rng.uniform(0.6, 1.4), rng.uniform(-0.15, 0.15)
        z0, dz = uni(ranges.object_depth_mm), rng.uniform(-30.0, 30.0)
        s = np.linspace(-0.5, 0.5, 6)
        uv = centre + np.outer(s * length, along) + np.outer(bend * np.cos(math.pi * s), across)
        pts = [[float(u), float(v), float(z0 + dz * si)] for (u, v), si in zip(uv, s)]
        wires.append({"points_uvz": pts, "radius_mm": uni(ranges.wire_radius_mm)})
    screws = []
    for _ in range(integer(ranges.n_screws)):
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        tip = [float(x) for x in rng.uniform(-0.3, 0.3, size=2)] + [uni(ranges.object_depth_mm)]
        screws.append(
            {
                "tip_uvz": tip,
                "direction": [float(x) for x in direction],
                "length_mm": uni(ranges.screw_length_mm),
                "radius_mm": uni(ranges.screw_radius_mm),
            }
        )
    d.update(wires=wires, screws=screws)
    return DomainDraw(**d)


def draw_domain(rng: np.random.Generator, ranges: DomainRanges = DomainRanges()) -> DomainDraw:
    """Draw the domain parameters of one sequence.

    A seed is taken from ``rng`` and the parameters are drawn from it, so the draw is
    reproducible from ``draw.seed`` alone with :func:`domain_from_seed`.

    Parameters
    ----------
    rng : np.random.Generator
        Source of the draw's seed.
    ranges : DomainRanges
        Parameter ranges.

    Returns
    -------
    DomainDraw
        The parameters.
    """
    return domain_from_seed(int(rng.integers(0, 2**31 - 1)), ranges)


# ---------------------------------------------------------------------------------------------
# objects


def nominal_intrinsics(height: int, width: int) -> CArmIntrinsics:
    """The default :class:`.scenarios.CArmSetup` detector sampled with ``height x width`` pixels."""
    setup = CArmSetup()
    return CArmIntrinsics.from_detector(setup.sdd_mm, setup.pixel_spacing_mm * setup.width / width, width, height)


def domain_objects(draw: DomainDraw, intrinsics: CArmIntrinsics, T_reference_mm=None) -> list:
    """The draw's wires and screws as cylinders in the CT frame.

    Parameters
    ----------
    draw : DomainDraw
        The draw.
    intrinsics : CArmIntrinsics
        Camera of the reference view (converts image-normalised positions to mm).
    T_reference_mm : torch.Tensor, optional
        ``(4, 4)`` ``T_optical_from_ct`` (mm) of the reference view where the objects are
        placed; default identity (the CT frame is that optical frame).

    Returns
    -------
    list of Cylinder
        Wires (steel) and screws (titanium) in the CT frame.
    """
    if not draw.wires and not draw.screws:
        return []
    T = torch.eye(4, dtype=torch.float64) if T_reference_mm is None else torch.as_tensor(T_reference_mm).to(torch.float64).cpu()
    R, t = T[:3, :3].numpy(), T[:3, 3].numpy()
    W, H = intrinsics.width, intrinsics.height

    def to_ct(uvz) -> np.ndarray:
        uvz = np.atleast_2d(np.asarray(uvz, dtype=np.float64))
        z = uvz[:, 2]
        x = (uvz[:, 0] * W + (W - 1) / 2.0 - intrinsics.cx) / intrinsics.fx * z
        y = (uvz[:, 1] * H + (H - 1) / 2.0 - intrinsics.cy) / intrinsics.fy * z
        return (np.stack([x, y, z], axis=1) - t) @ R  # R^T (p - t), rows

    out = []
    for w in draw.wires:
        out += obj.wire(to_ct(w["points_uvz"]), radius_mm=float(w["radius_mm"]))
    for s in draw.screws:
        direction_ct = np.asarray(s["direction"], dtype=np.float64) @ R
        out += obj.screw(to_ct(s["tip_uvz"])[0], direction_ct, length_mm=float(s["length_mm"]), radius_mm=float(s["radius_mm"]))
    return out


# ---------------------------------------------------------------------------------------------
# image formation


_GRIDS: dict = {}


def _centred_grid(height: int, width: int):
    """Pixel coordinates ``(H, W)`` float32 relative to the image centre (cached)."""
    key = (height, width)
    if key not in _GRIDS:
        y, x = np.mgrid[0:height, 0:width].astype(np.float32)
        _GRIDS[key] = (x - (width - 1) / 2.0, y - (height - 1) / 2.0)
    return _GRIDS[key]


def shutter_open_fraction(draw: DomainDraw, height: int, width: int) -> np.ndarray:
    """Open fraction ``(H, W)`` float32 in ``[0, 1]`` of the collimator (1 everywhere for ``none``)."""
    if draw.collimator == "none":
        return np.ones((height, width), dtype=np.float32)
    x, y = _centred_grid(height, width)
    x = x - draw.collimator_dx * width
    y = y - draw.collimator_dy * height
    if draw.collimator == "rect":
        a = math.radians(draw.collimator_angle_deg)
        xr = x * math.cos(a) + y * math.sin(a)
        yr = -x * math.sin(a) + y * math.cos(a)
        dist = np.maximum(np.abs(xr) - draw.collimator_half_width * width, np.abs(yr) - draw.collimator_half_height * height)
    else:
        dist = np.sqrt(x * x + y * y) - draw.collimator_radius * min(height, width)
    edge = max(1.0, EDGE_WIDTH_FRACTION * max(height, width))
    return np.clip(0.5 - dist / edge, 0.0, 1.0).astype(np.float32)


def _fluence_and_table(draw: DomainDraw, height: int, width: int):
    """Relative primary fluence ``(H, W)`` (heel x shutter), the table's line integral and the measuring field."""
    x, y = _centred_grid(height, width)
    open_frac = shutter_open_fraction(draw, height, width)
    fluence = SHUTTER_TRANSMISSION + (1.0 - SHUTTER_TRANSMISSION) * open_frac
    if draw.heel_fraction > 0:
        a = math.radians(draw.heel_angle_deg)
        c, s = math.cos(a), math.sin(a)
        extent = (width - 1) * abs(c) + (height - 1) * abs(s)
        fluence = fluence * (1.0 + draw.heel_fraction * (x * c + y * s) / max(extent, 1.0))
    table = None
    if draw.table_strength > 0:
        a = math.radians(draw.table_angle_deg)
        dist = x * math.cos(a) + y * math.sin(a) - draw.table_offset * max(height, width) / 2.0
        edge = max(1.0, EDGE_WIDTH_FRACTION * max(height, width))
        table = (draw.table_strength * np.clip(0.5 + dist / edge, 0.0, 1.0)).astype(np.float32)
    measuring = (open_frac > 0.5) & (np.abs(x) <= width / 4.0) & (np.abs(y) <= height / 4.0)
    if not measuring.any():
        measuring = open_frac > 0.5 if (open_frac > 0.5).any() else np.ones_like(measuring)
    return fluence.astype(np.float32), table, measuring


def compose_frame(
    components: np.ndarray,
    draw: DomainDraw,
    rng: np.random.Generator,
    T_optical_from_ct_mm=None,
    intrinsics: CArmIntrinsics | None = None,
    objects=(),
    T_reference_mm=None,
) -> np.ndarray:
    """One detector frame from the two line-integral components and a domain draw.

    Parameters
    ----------
    components : np.ndarray
        ``(2, H, W)`` float32 line integrals ``L_w`` and ``L_b`` (dimensionless) of
        :func:`render_components`.
    draw : DomainDraw
        Domain parameters.
    rng : np.random.Generator
        Source of the quantum noise (unused when ``draw.photons_per_pixel`` is None).
    T_optical_from_ct_mm : torch.Tensor, optional
        ``(4, 4)`` pose of this frame, mm; needed for ``objects``. Default: identity.
    intrinsics : CArmIntrinsics, optional
        Camera of the frame (``H x W``); default: :func:`nominal_intrinsics`.
    objects : sequence of Cylinder
        Extra foreign objects in the CT frame (added to the draw's own wires and screws).
    T_reference_mm : torch.Tensor, optional
        ``(4, 4)`` pose, mm, of the view where the draw's objects are placed (the first frame
        of a sequence, so they move with the patient); default: this frame's pose.

    Returns
    -------
    np.ndarray
        ``(H, W)`` frame in the encoding's dtype (uint8, uint16 with values up to
        ``2^bit_depth - 1``, or float32 in about ``[0, 1]``).
    """
    comp = np.asarray(components, dtype=np.float32)
    if comp.ndim != 3 or comp.shape[0] != 2:
        raise ConfigError(f"components must be (2, H, W), got shape {comp.shape}")
    _, H, W = comp.shape
    if intrinsics is None:
        intrinsics = nominal_intrinsics(H, W)
    elif (intrinsics.height, intrinsics.width) != (H, W):
        raise ConfigError(f"intrinsics are {intrinsics.width}x{intrinsics.height} but the components {W}x{H}")
    if objects and T_optical_from_ct_mm is None:
        raise ConfigError("objects in the CT frame need T_optical_from_ct_mm to be projected")

    # material line integral
    L = comp[0] + np.float32(draw.bone_contrast) * comp[1]
    cyl = list(objects)
    if draw.wires or draw.screws:
        T_ref = T_reference_mm if T_reference_mm is not None else T_optical_from_ct_mm
        cyl += domain_objects(draw, intrinsics, T_ref)
    if cyl:
        T = torch.eye(4, dtype=torch.float64) if T_optical_from_ct_mm is None else torch.as_tensor(T_optical_from_ct_mm)
        L = L + obj.project_cylinders_roi(cyl, T, intrinsics.K(dtype=torch.float64), H, W).astype(np.float32)
    L = np.float32(draw.mu_scale) * L
    fluence, table, measuring = _fluence_and_table(draw, H, W)
    if table is not None:
        L = L + table
    if draw.beam_hardening > 0:
        L = L / (1.0 + np.float32(draw.beam_hardening) * L)

    # detector
    noise = draw.photons_per_pixel is not None
    I0 = float(draw.photons_per_pixel) if noise else NOISELESS_PHOTONS
    primary = np.float32(I0) * fluence * np.exp(-L)
    sigma_px = draw.scatter_sigma_fraction * max(H, W)
    # scatter on 4x4 block means once the kernel is >= 16 px wide: < 1 % of the scatter off the exact Gaussian
    counts = add_scatter(primary, draw.scatter_fraction, sigma_px, downsample=min(4, max(1, int(sigma_px // 4))), source_weight=np.minimum(L, np.float32(1.0)))
    counts = detect(counts, rng, noise=noise, blur_sigma_px=draw.blur_sigma_px)
    value = display_values(counts, I0, draw.display)
    if draw.display == "transmission" and draw.transmission_exponent != 1.0:
        value = value ** np.float32(draw.transmission_exponent)

    # display: window in the measuring field, gamma, gain/offset, quantisation
    sample = value[measuring]
    if sample.size > 16384:
        sample = sample[:: sample.size // 16384]
    lo, hi = np.percentile(sample, [draw.window_low_pct, draw.window_high_pct])
    t = np.clip((value - np.float32(lo)) / np.float32(max(hi - lo, 1e-6)), 0.0, 1.0)
    if draw.gamma != 1.0:
        t = t ** np.float32(draw.gamma)
    out = (np.float32(draw.offset) + np.float32(draw.gain) * t) * np.float32(draw.max_code)
    return quantise(out, draw.encoding, None if draw.encoding == "32FC1" else int(draw.max_code))


def simulate_randomised_sequence(
    components: np.ndarray,
    poses_mm,
    intrinsics: CArmIntrinsics,
    draw: DomainDraw,
    seed: int,
    objects=(),
    fps: float = 15.0,
    frame_id: str = "carm_optical",
    meta: dict | None = None,
    start_ns: int = DEFAULT_START_NS,
) -> SimulatedSequence:
    """A sequence with one domain draw (fixed physics) and per-frame noise.

    Parameters
    ----------
    components : np.ndarray
        ``(F, 2, H, W)`` float32 line-integral components of :func:`render_components`.
    poses_mm : torch.Tensor
        ``(F, 4, 4)`` ground-truth ``T_optical_from_ct``, mm (the draw's objects are placed in
        the view of frame 0).
    intrinsics : CArmIntrinsics
        Camera of every frame.
    draw : DomainDraw
        Domain parameters of the sequence.
    seed : int
        Seed of the noise.
    objects : sequence of Cylinder
        Extra foreign objects in the CT frame.
    fps : float
        Frame rate for the stamps, Hz.
    frame_id : str
        Optical frame name.
    meta : dict, optional
        Extra description; ``domain`` (the draw), ``fps``, ``seed`` and ``objects`` are added.
    start_ns : int
        Stamp of the first frame, ns.

    Returns
    -------
    SimulatedSequence
        ``intensity`` is the draw's display, ``encoding`` its encoding.
    """
    if fps <= 0:
        raise ConfigError("fps must be positive")
    comp = np.asarray(components, dtype=np.float32)
    poses = torch.as_tensor(poses_mm).to(torch.float64)
    if comp.ndim != 4 or comp.shape[1] != 2:
        raise ConfigError(f"components must be (F, 2, H, W), got shape {comp.shape}")
    if poses.ndim != 3 or poses.shape[0] != comp.shape[0]:
        raise ConfigError(f"poses_mm must be (F, 4, 4) with F = {comp.shape[0]}, got shape {tuple(poses.shape)}")
    rng = np.random.default_rng(seed)
    images = np.stack(
        [compose_frame(comp[f], draw, rng, poses[f], intrinsics, objects=objects, T_reference_mm=poses[0]) for f in range(len(comp))]
    )
    stamps = start_ns + np.rint(np.arange(len(comp)) * 1e9 / fps).astype(np.int64)
    info = dict(meta or {})
    info.update({"fps": fps, "seed": seed, "domain": asdict(draw), "objects": [vars(o) for o in objects]})
    return SimulatedSequence(
        images=images,
        encoding=draw.encoding,
        intensity=draw.display,
        poses_mm=poses.detach().cpu().numpy(),
        intrinsics=intrinsics,
        stamps_ns=stamps,
        frame_id=frame_id,
        meta=info,
    )
