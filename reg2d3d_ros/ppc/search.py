"""Global in-plane search: the start of a PPC registration from a rough pose.

PPC is a local method: its correspondence search looks a few pixels across each contour, so
a start whose projection is more than about one vertebra's half-height away from the truth
locks onto a neighbour's edges or drifts (on the tuning cases, starts with the in-plane offset
removed succeed far more often than the same starts as given; see the PPC issue's closing note).
The in-plane offset is also what the image observes best. This module finds it by exhaustive
search before the local iterations:

- the moving image (the registrator's DRR) is rendered at the start pose, rotated about the
  principal ray through the target's centre by each of a few angles;
- for every image-plane shift within ``range_mm`` (at the target's depth), the normalised
  gradient correlation (NGC) of the moving gradient field with the frame's gradient field,
  over the moving image's footprint, is computed at once by FFT cross-correlation:

      NGC(s) = sum_x gm(x) . gf(x + s) / sqrt(sum_x |gm(x)|^2 * sum_{x in footprint} |gf(x + s)|^2);

- the best (angle, shift) are returned as candidate poses, best first, at least
  ``min_separation_mm`` apart in the image plane, so that a caller can refine several (the
  spine repeats itself every vertebra: the second peak is often the neighbour, or the truth).

Conventions as in :mod:`reg2d3d_ros.geometry`: ``T_optical_from_ct`` (4, 4) float64, mm; image
pixels ``(u, v)``, optical x to the right (u), y down (v), z along the principal ray.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .matching import gradient_image


@dataclass
class InPlaneCandidate:
    """One candidate of the in-plane search.

    Attributes
    ----------
    T_optical_from_ct : torch.Tensor
        ``(4, 4)`` candidate pose, mm.
    score : float
        NGC of the moving gradient with the frame's at this candidate, in ``[-1, 1]``.
    rot_deg : float
        Rotation about the principal-ray direction through the target's centre, degrees.
    shift_mm : tuple of float
        Image-plane translation (optical x, y) at the target's depth, mm.
    """

    T_optical_from_ct: torch.Tensor
    score: float
    rot_deg: float
    shift_mm: tuple


def rotate_about_z(T: torch.Tensor, angle_rad: float, center_opt: torch.Tensor) -> torch.Tensor:
    """``(4, 4)`` pose ``T`` followed by a rotation about the optical z axis through ``center_opt`` ``(3,)`` mm."""
    c, s = math.cos(angle_rad), math.sin(angle_rad)
    M = torch.eye(4, dtype=T.dtype, device=T.device)
    M[0, 0], M[0, 1], M[1, 0], M[1, 1] = c, -s, s, c
    M[:3, 3] = center_opt - M[:3, :3] @ center_opt
    return M @ T


def translate(T: torch.Tensor, t_opt_mm) -> torch.Tensor:
    """``(4, 4)`` pose ``T`` followed by a translation ``(3,)`` in the optical frame, mm."""
    out = T.clone()
    out[:3, 3] = out[:3, 3] + torch.as_tensor(t_opt_mm, dtype=T.dtype, device=T.device)
    return out


def moving_gradient_and_footprint(registrator, T: torch.Tensor, intr):
    """``(grad (2, h, w), footprint (h, w) bool)`` of the registrator's whole DRR at pose ``T``, or ``None`` if empty.

    The footprint is where the gradient magnitude exceeds 2 % of its maximum: the projected
    structure and its edges.
    """
    with torch.no_grad():
        drr = registrator.renderer.render(T[None], intr.K(registrator.dtype), intr.height, intr.width).line_integral[0]
    grad = gradient_image(drr.to(torch.float32), registrator.config.smooth_sigma_px)
    mag = torch.linalg.norm(grad, dim=0)
    if float(mag.max()) <= 0:
        return None
    return grad, mag > 0.02 * float(mag.max())


def ngc_map(grad_fixed: torch.Tensor, grad_moving: torch.Tensor, footprint: torch.Tensor, max_shift_px: int) -> torch.Tensor:
    """NGC of a moving gradient field against a fixed one for every integer shift.

    Parameters
    ----------
    grad_fixed, grad_moving : torch.Tensor
        ``(2, h, w)`` gradient fields (x, y components) of the frame and of the moving image,
        same size, float.
    footprint : torch.Tensor
        ``(h, w)`` bool, where the moving image has structure (the normalisation of the fixed
        field runs over the shifted footprint only).
    max_shift_px : int
        Largest shift in each direction, pixels.

    Returns
    -------
    torch.Tensor
        ``(2 m + 1, 2 m + 1)`` NGC for shifts ``(dv, du)`` in ``[-m, m]`` (row: ``dv``, column:
        ``du``): the moving image moved by ``(du, dv)`` pixels. Shifts whose footprint leaves the
        frame see zero gradients there.
    """
    _, h, w = grad_fixed.shape
    m = int(max_shift_px)
    from scipy.fft import next_fast_len

    H, W = next_fast_len(h + m + 1, real=True), next_fast_len(w + m + 1, real=True)  # pad: no wrap-around for |shift| <= m
    dtype = torch.float64
    gf = grad_fixed.to(dtype)
    gm = grad_moving.to(dtype) * footprint.to(dtype)
    fp = footprint.to(dtype)

    def xcorr(a, b):
        # c(s) = sum_x b(x) a(x + s), a and b (..., h, w)
        A = torch.fft.rfft2(a, s=(H, W))
        B = torch.fft.rfft2(b, s=(H, W))
        return torch.fft.irfft2(A * torch.conj(B), s=(H, W))

    num = xcorr(gf, gm).sum(dim=0)
    energy_f = xcorr((gf * gf).sum(dim=0), fp)
    energy_m = float((gm * gm).sum())
    ngc = num / torch.sqrt(energy_f.clamp(min=1e-12) * max(energy_m, 1e-12))
    ngc = torch.where(energy_f > 1e-9 * energy_f.max().clamp(min=1e-30), ngc, torch.zeros_like(ngc))
    rows = torch.cat([torch.arange(H - m, H), torch.arange(0, m + 1)])
    cols = torch.cat([torch.arange(W - m, W), torch.arange(0, m + 1)])
    return ngc[rows][:, cols]


def inplane_search(registrator, image_att, intrinsics, T_start: torch.Tensor, range_mm: float = 30.0,
                   angles_deg=(-10.0, -5.0, 0.0, 5.0, 10.0), level: float = 0.25, n_candidates: int = 3,
                   min_separation_mm: float = 8.0, center_ct_mm: torch.Tensor | None = None) -> list:
    """Best in-plane corrections of a start pose (see the module docstring).

    Parameters
    ----------
    registrator : PPCRegistrator
        Provides the moving image (its ``renderer``) and the smoothing of the gradients.
    image_att : np.ndarray or torch.Tensor
        ``(H, W)`` attenuation-like frame.
    intrinsics : CArmIntrinsics
        Camera of the frame.
    T_start : torch.Tensor
        ``(4, 4)`` start pose ``T_optical_from_ct``, mm.
    range_mm : float
        Largest image-plane shift searched in each direction, mm at the target's depth.
    angles_deg : sequence of float
        Rotations about the principal-ray direction through the target's centre, degrees.
    level : float
        Resolution factor of the search images (``intrinsics.scaled(level)``).
    n_candidates : int
        How many candidates to return.
    min_separation_mm : float
        Candidates closer than this in the image plane (at the target's depth) to a better one
        are suppressed.
    center_ct_mm : torch.Tensor, optional
        ``(3,)`` target centre, CT frame, mm; default the centroid of the registrator's surface points.

    Returns
    -------
    list of InPlaneCandidate
        Best first; empty when the target does not project into the frame at any angle.
    """
    T_start = torch.as_tensor(T_start, dtype=registrator.dtype)
    intr = intrinsics.scaled(level)
    grad_fixed = registrator.fixed_gradients(image_att, [level])[level]
    c_ct = registrator.pts.mean(dim=0) if center_ct_mm is None else torch.as_tensor(center_ct_mm, dtype=T_start.dtype)
    c_opt = T_start[:3, :3] @ c_ct + T_start[:3, 3]
    if float(c_opt[2]) <= 0:
        return []  # the target is behind the source: nothing to search
    mm_per_px = float(c_opt[2]) / float(intr.fx)
    m = max(1, int(math.ceil(range_mm / mm_per_px)))
    found = []  # (score, angle, du, dv)
    for ang in angles_deg:
        moving = moving_gradient_and_footprint(registrator, rotate_about_z(T_start, math.radians(ang), c_opt), intr)
        if moving is None or int(moving[1].sum()) < 16:
            continue
        grad_moving, footprint = moving
        ngc = ngc_map(grad_fixed, grad_moving, footprint, m)
        # local maxima (3x3) as candidates
        pooled = torch.nn.functional.max_pool2d(ngc[None, None], 3, stride=1, padding=1)[0, 0]
        peaks = ((ngc >= pooled) & (ngc > 0)).nonzero()
        for dv, du in peaks.tolist():
            found.append((float(ngc[dv, du]), ang, du - m, dv - m))
    found.sort(key=lambda x: -x[0])
    out = []
    for score, ang, du, dv in found:
        shift = (du * mm_per_px, dv * float(c_opt[2]) / float(intr.fy))
        if any(math.hypot(shift[0] - o.shift_mm[0], shift[1] - o.shift_mm[1]) < min_separation_mm for o in out):
            continue
        if math.hypot(*shift) > range_mm * math.sqrt(2) + 1e-6:
            continue
        T_rot = rotate_about_z(T_start, math.radians(ang), c_opt)
        T_cand = translate(T_rot, (shift[0], shift[1], 0.0))
        out.append(InPlaneCandidate(T_cand, score, ang, shift))
        if len(out) >= n_candidates:
            break
    return out


class GradientCorrelation:
    """Gradient correlation of the registrator's moving image with one frame, as a function of the pose.

    ``score(T)`` is the NGC of the moving gradient at pose ``T`` with the frame's, over the
    moving image's footprint: the same score as :func:`ngc_map` at zero shift. It looks at the
    whole projected structure (and, with the ``roi`` moving image, its neighbours) rather than
    at the contour correspondences a PPC update optimises, so it can judge those updates
    (``PPCConfig.guard``) and a finished registration (:func:`pose_gradient_correlation`). The
    frame's gradient is computed once, at construction.

    Parameters
    ----------
    registrator : PPCRegistrator
        Provides the moving image.
    image_att : np.ndarray or torch.Tensor
        ``(H, W)`` attenuation-like frame.
    intrinsics : CArmIntrinsics
        Camera of the frame.
    level : float
        Resolution factor for frames with the registrator's reference pixel size; coarser frames
        use a proportionally larger one (capped at 1), so the score means the same at any size.

    Attributes
    ----------
    evaluations : int
        Poses scored so far.
    grad_fixed : torch.Tensor
        ``(2, h, w)`` float64 gradient of the frame at the score's resolution.
    """

    def __init__(self, registrator, image_att, intrinsics, level: float = 0.5):
        ref = registrator.config.reference_pixel_mrad
        pixel_mrad = 1000.0 / float(intrinsics.fx)
        s = min(1.0, level * max(1.0, pixel_mrad / ref))
        self.registrator = registrator
        self.intrinsics = intrinsics.scaled(s)
        self.grad_fixed = registrator.fixed_gradients(image_att, [s])[s].to(torch.float64)
        self._energy_fixed = (self.grad_fixed * self.grad_fixed).sum(dim=0)
        self.evaluations = 0

    def __call__(self, T: torch.Tensor) -> float:
        """Score in ``[-1, 1]`` of pose ``T`` (``(4, 4)``, mm); 0 when the structure does not project into the frame."""
        self.evaluations += 1
        moving = moving_gradient_and_footprint(self.registrator, torch.as_tensor(T, dtype=self.registrator.dtype), self.intrinsics)
        if moving is None:
            return 0.0
        grad, footprint = moving
        gm = grad.to(torch.float64) * footprint
        energy_f = float((self._energy_fixed * footprint).sum())
        energy_m = float((gm * gm).sum())
        if energy_f <= 1e-12 or energy_m <= 1e-12:
            return 0.0
        return float((gm * self.grad_fixed).sum()) / math.sqrt(energy_f * energy_m)


def pose_gradient_correlation(registrator, image_att, intrinsics, T: torch.Tensor, level: float = 0.5) -> float:
    """NGC of the moving gradient at pose ``T`` with the frame's, over the moving image's footprint.

    One evaluation of :class:`GradientCorrelation` (see there for the parameters): a check of a
    finished registration.

    Returns
    -------
    float
        In ``[-1, 1]``; 0 when the structure does not project into the frame.
    """
    return GradientCorrelation(registrator, image_att, intrinsics, level)(T)


@dataclass
class PeakCheck:
    """How the gradient correlation at a pose compares with nearby in-plane shifts of it.

    A contrast-free confidence: every number is a ratio or a distance, so it does not change
    with the frame's gain, offset, dose or display mapping the way absolute scores do.

    Attributes
    ----------
    gc : float
        NGC of the moving gradient with the frame's at the pose (zero shift), in ``[-1, 1]``.
    peak_gc : float
        Highest NGC over the shifts within the range (a disc, less one pixel at its rim).
    peak_offset_mm : float
        Image-plane distance (mm at the target's depth) from the pose to that highest shift.
    ring_gc : float
        Median NGC over the shifts between half the range and the range (the surroundings).
    shift_mm : tuple of float
        Optical (x, y) translation (mm) that moves the pose onto the peak, refined to sub-pixel
        precision by a parabola through the peak and its neighbours along each axis.
    shift_px : tuple of float
        The same shift in pixels ``(du, dv)`` of the check's resolution.
    moving : tuple or None
        ``(grad (2, h, w) float32, footprint (h, w) bool)``: the moving gradient the check
        rendered at the pose (reused by :func:`shifted_gc` to score this pose, or its peak, on
        the next frame without rendering it again).
    """

    gc: float
    peak_gc: float
    peak_offset_mm: float
    ring_gc: float
    shift_mm: tuple = (0.0, 0.0)
    shift_px: tuple = (0.0, 0.0)
    moving: tuple | None = field(default=None, repr=False)

    @property
    def prominence(self) -> float:
        """``(gc - ring_gc) / |gc|``: how far the pose stands out of its surroundings (0 when flat)."""
        return (self.gc - self.ring_gc) / max(abs(self.gc), 1e-6)


def peak_check(registrator, image_att, intrinsics, T: torch.Tensor, range_mm: float = 12.0, level: float = 0.5,
               grad_fixed: torch.Tensor | None = None) -> PeakCheck | None:
    """The :class:`PeakCheck` of pose ``T`` (``(4, 4)``, mm) on one frame; ``None`` when the target does not project.

    Parameters
    ----------
    registrator : PPCRegistrator
        Provides the moving image.
    image_att : np.ndarray or torch.Tensor
        ``(H, W)`` attenuation-like frame.
    intrinsics : CArmIntrinsics
        Camera of the frame.
    T : torch.Tensor
        ``(4, 4)`` pose ``T_optical_from_ct``, mm.
    range_mm : float
        Largest image-plane shift compared, mm at the target's depth.
    level : float
        Resolution factor for frames with the registrator's reference pixel size (coarser
        frames use a proportionally larger one, capped at 1, as :class:`GradientCorrelation`).
    grad_fixed : torch.Tensor, optional
        ``(2, h, w)`` the frame's gradient at that resolution when the caller has it.
    """
    ref = registrator.config.reference_pixel_mrad
    s = min(1.0, level * max(1.0, (1000.0 / float(intrinsics.fx)) / ref))
    intr = intrinsics.scaled(s)
    if grad_fixed is None:
        grad_fixed = registrator.fixed_gradients(image_att, [s])[s]
    T = torch.as_tensor(T, dtype=registrator.dtype)
    c_opt = T[:3, :3] @ registrator.pts.mean(dim=0) + T[:3, 3]
    if float(c_opt[2]) <= 0:
        return None
    moving = moving_gradient_and_footprint(registrator, T, intr)
    if moving is None or int(moving[1].sum()) < 16:
        return None
    mm_per_px = float(c_opt[2]) / float(intr.fx)
    m = max(2, int(math.ceil(range_mm / mm_per_px)))
    ngc = ngc_map(grad_fixed, moving[0], moving[1], m)
    d = torch.arange(-m, m + 1, dtype=torch.float64) * mm_per_px
    dist = torch.sqrt(d[:, None] ** 2 + d[None, :] ** 2)
    # the peak is looked for inside the disc of the range, one pixel short of its rim: a maximum on
    # the rim or in the square's corners is a structure entering the window, not a nearby optimum
    inside = dist <= range_mm - mm_per_px
    k = int(torch.argmax(torch.where(inside, ngc, torch.full_like(ngc, -2.0))))
    iv, iu = divmod(k, ngc.shape[1])
    ring = ngc[(dist >= 0.5 * range_mm) & (dist <= range_mm)]

    def vertex(a: float, b: float, c: float) -> float:  # offset of a parabola's vertex through (-1, a), (0, b), (1, c)
        den = a - 2.0 * b + c
        return 0.0 if den >= 0 else max(-0.5, min(0.5, 0.5 * (a - c) / den))

    du = iu - m + (vertex(float(ngc[iv, iu - 1]), float(ngc[iv, iu]), float(ngc[iv, iu + 1])) if 0 < iu < 2 * m else 0.0)
    dv = iv - m + (vertex(float(ngc[iv - 1, iu]), float(ngc[iv, iu]), float(ngc[iv + 1, iu])) if 0 < iv < 2 * m else 0.0)
    z = float(c_opt[2])
    return PeakCheck(gc=float(ngc[m, m]), peak_gc=float(ngc.flatten()[k]), peak_offset_mm=float(dist.flatten()[k]),
                     ring_gc=float(ring.median()) if ring.numel() else 0.0, shift_mm=(du * z / float(intr.fx), dv * z / float(intr.fy)),
                     shift_px=(du, dv), moving=moving)


def shifted_gc(grad_fixed: torch.Tensor, moving: tuple, shift_px=(0.0, 0.0)) -> float:
    """NGC of a cached moving gradient, moved by a sub-pixel shift, with a frame's gradient.

    The score :class:`GradientCorrelation` gives the pose a :class:`PeakCheck` rendered
    (``shift_px`` zero) or that pose moved in-plane onto its peak (``shift_px`` the check's
    ``shift_px``: an in-plane translation moves the projection of a target far from the source by
    the same number of pixels everywhere), without rendering it again.

    Parameters
    ----------
    grad_fixed : torch.Tensor
        ``(2, h, w)`` gradient of the frame at the check's resolution.
    moving : tuple
        ``(grad (2, h, w), footprint (h, w) bool)`` of :attr:`PeakCheck.moving`.
    shift_px : tuple of float
        ``(du, dv)`` pixels the moving image moves (right, down).

    Returns
    -------
    float
        In ``[-1, 1]``; 0 when nothing overlaps.
    """
    grad, footprint = moving
    du, dv = float(shift_px[0]), float(shift_px[1])
    if du != 0.0 or dv != 0.0:
        _, h, w = grad.shape
        # sample the moving image at x - shift (align_corners=True: x_n = 2 x / (n - 1) - 1)
        ys = torch.arange(h, dtype=grad.dtype) - dv
        xs = torch.arange(w, dtype=grad.dtype) - du
        gy = (2.0 * ys / max(h - 1, 1) - 1.0)[:, None].expand(h, w)
        gx = (2.0 * xs / max(w - 1, 1) - 1.0)[None, :].expand(h, w)
        grid = torch.stack([gx, gy], dim=-1)[None]
        fp = torch.nn.functional.grid_sample(footprint[None, None].to(grad.dtype), grid, mode="bilinear", padding_mode="zeros",
                                             align_corners=True)[0, 0]
        footprint = fp > 0.5
        # the gradient by a phase ramp (exact for the smoothed, band-limited field; bilinear
        # interpolation would low-pass it and raise its correlation with the frame)
        pad = int(math.ceil(max(abs(du), abs(dv)))) + 2
        H, W = h + pad, w + pad
        spec = torch.fft.rfft2(grad.to(torch.float64), s=(H, W))
        ky = torch.fft.fftfreq(H, dtype=torch.float64)[:, None]
        kx = torch.fft.rfftfreq(W, dtype=torch.float64)[None, :]
        ramp = torch.exp(-2j * math.pi * (ky * dv + kx * du))
        grad = torch.fft.irfft2(spec * ramp, s=(H, W))[:, :h, :w]
    gf = grad_fixed.to(torch.float64)
    gm = grad.to(torch.float64) * footprint
    energy_f = float(((gf * gf).sum(dim=0) * footprint).sum())
    energy_m = float((gm * gm).sum())
    if energy_f <= 1e-12 or energy_m <= 1e-12:
        return 0.0
    return float((gm * gf).sum()) / math.sqrt(energy_f * energy_m)
