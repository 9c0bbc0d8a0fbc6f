"""Iterative PPC registration and frame-to-frame tracking (conventions: :mod:`reg2d3d_ros.geometry`).

One *update* (iteration) at a resolution level ``s``:

1. render the region of interest (the target vertebra's crop of the CT) at the current pose
   with the level's intrinsics and take its smoothed gradient (the moving gradient image);
2. select the apparent-contour surface points at the current pose (:mod:`.contours`);
3. find their correspondences in the X-ray frame's gradient by NGC search (:mod:`.matching`);
4. weight them by their NGC (scores below ``ngc_min`` and matches at the end of the search range
   are rejected) and solve the PPC model
   (:mod:`.solver`, with MCCR), then apply the motion: ``T <- M @ T``.

Levels run coarse to fine (default 0.25, 0.5, 1.0 of the frame's size); at the coarsest level the
first ``in_plane_iterations`` updates move only in the image plane (rotation about the principal
ray and image-plane translation) and the next ``no_depth_iterations`` keep the depth (optical z
translation) fixed. A level ends
when an update moves less than ``stop_rot_deg`` and ``stop_trans_mm`` or after its maximum number
of updates. *Tracking* is the same procedure started from the previous frame's pose with one in-plane
update at full resolution (:data:`TRACKING_CONFIG`).

*Polish* (optional, ``polish_levels``): after the PPC levels, the pose is refined by gradient
ascent on the gradient correlation of the moving image's DRR with the frame, all six degrees
of freedom (:class:`reg2d3d_ros.intensity.IntensityRegistrator` on the same attenuation
volume). PPC uses a few hundred sparse contour correspondences, and on frames where overlapping
anatomy blurs or mimics the target's edges its optimum is biased by a millimetre or more; the
dense gradient correlation over the whole projected structure is more precise near the optimum
(on the tuning cases: mean mRPD of the successes 0.81 -> 0.44 to 0.61 mm), but has a small
capture range, so it only polishes a PPC result; a polish that moves the target's surface
points by more than ``polish_max_mm`` on average, or that does not raise the gradient
correlation of the moving image with the frame, is discarded.

*Guard* (optional, ``guard``): the seed's iteration applies every PPC update. On simulated
frames dominated by overlapping anatomy, the updates take trust-region-sized steps along weakly
observed directions (depth, out-of-plane rotation) and walk away from good starts while the
inlier fraction can still rise, so the inlier fraction cannot judge them. With the guard, each
update is judged by the gradient correlation of the moving image with the frame
(:class:`.search.GradientCorrelation`, at resolution ``min(level, guard_level)``), which on the
tuning cases peaks at the truth in every degree of freedom: the update is applied if it does not
lower it; else half of it (geodesic, ``exp(log(M) / 2)``) if that does not; else the update
restricted to the image plane if that does not; else the pose stays and the update counts as
rejected (a level ends after ``guard_patience`` rejections in a row). So within a level the
score never decreases. With the in-plane search, ``search_select="gc"`` also compares the starts
by this score instead of the inlier fraction.

Confidence (for the node's "tracking lost" decision), from the last update at the finest level:
the inlier fraction (contour points whose NGC passes ``ngc_min`` and whose point-to-plane residual
after the solve is below ``inlier_px`` pixels at their depth), the mean NGC of the inliers and
the residual RMS.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from ..drr import DRRRenderer, downsample
from ..errors import ConfigError
from ..geometry.camera import CArmIntrinsics
from ..volume.target import BONE_FLOOR_HU, structure_region, target_attenuation
from .contours import Contours, select_contours
from .matching import gradient_image, ngc_search
from .solver import IN_PLANE, NO_DEPTH, motion_about, solve_ppc, weighted_centroid
from .surface import SurfacePoints, canny_surface_points


def band_mask(uv: torch.Tensor, height: int, width: int, radius_px: int) -> torch.Tensor:
    """Pixels within ``radius_px`` (Chebyshev distance) of any of the points ``uv``.

    Parameters
    ----------
    uv : torch.Tensor
        ``(N, 2)`` pixel positions ``(u, v)``, any float dtype.
    height, width : int
        Image size.
    radius_px : int
        Half-width of the square neighbourhood, pixels.

    Returns
    -------
    torch.Tensor
        ``(height, width)`` bool.
    """
    seed = torch.zeros(height, width, dtype=torch.float32, device=uv.device)
    ij = torch.round(uv.detach()).long()
    ij[:, 0].clamp_(0, width - 1)
    ij[:, 1].clamp_(0, height - 1)
    seed[ij[:, 1], ij[:, 0]] = 1.0
    r = int(radius_px)
    for dim in (0, 1):  # separable box sum by cumulative sums: O(H W) for any radius
        c = torch.cumsum(torch.nn.functional.pad(seed.movedim(dim, -1), (r + 1, r)), dim=-1)
        seed = (c[..., 2 * r + 1 :] - c[..., : -2 * r - 1]).movedim(-1, dim)
    return seed > 0.5


def deviation_about(T: torch.Tensor, T_ref: torch.Tensor, center_opt: torch.Tensor) -> torch.Tensor:
    """Deviation ``(6,)`` of pose ``T`` from ``T_ref`` in the parametrisation of a PPC update.

    ``D = T T_ref^-1`` is the motion (optical frame of ``T``) that took ``T_ref`` to ``T``; the
    result is its rotation vector (rad) and the displacement (mm) of ``center_opt`` under
    ``D^-1`` negated, i.e. the ``dv`` that would undo it is approximately ``-deviation``.
    """
    from ..geometry.se3 import invert_transform, so3_log

    D = T @ invert_transform(T_ref)
    rot = so3_log(D[:3, :3])
    # position of the centre before the motion, then its displacement
    D_inv = invert_transform(D)
    before = D_inv[:3, :3] @ center_opt + D_inv[:3, 3]
    return torch.cat([rot, center_opt - before])


@dataclass
class Correspondences:
    """Contour points of one update and their 2-D correspondences (input of a PPC solve).

    Attributes
    ----------
    contours : Contours
        ``N`` contour points at the current pose (optical frame, mm; pixels of the level).
    uv_corr : torch.Tensor
        ``(N, 2)`` correspondences ``p'``, pixels of the level.
    score : torch.Tensor
        ``(N,)`` NGC at the best shift.
    shift_px : torch.Tensor
        ``(N,)`` signed shift along the image normal, pixels of the level.
    at_limit : torch.Tensor
        ``(N,)`` bool, best shift at the end of the search range.
    K : torch.Tensor
        ``(3, 3)`` intrinsics of the level.
    search_px : int
        Search range of the level, pixels.
    """

    contours: Contours
    uv_corr: torch.Tensor
    score: torch.Tensor
    shift_px: torch.Tensor
    at_limit: torch.Tensor
    K: torch.Tensor
    search_px: int

    def __len__(self) -> int:
        return len(self.contours)


def update_prior_precision(config: "PPCConfig", noise_mm: float, dtype=torch.float64) -> torch.Tensor:
    """``(6,)`` diagonal of the zero-mean prior on one update (``noise^2 / prior^2`` per degree of freedom)."""
    prior = torch.tensor([math.radians(config.prior_rot_deg)] * 3 + list(config.prior_trans_mm), dtype=dtype)
    return noise_mm**2 / prior**2


@dataclass(frozen=True)
class PPCConfig:
    """Parameters of PPC registration (defaults: full registration from a rough start).

    Attributes
    ----------
    levels : tuple of float
        Resolution factors, coarse to fine, for frames whose pixels subtend
        ``reference_pixel_mrad`` (512x512 at 0.6 mm, SDD 1020 mm). Coarser frames use
        proportionally larger factors (capped at 1; levels that then coincide are merged, the finer
        one's iterations and search range kept), so a level always means the same physical
        pixel size: a 0.25 level of a 256x256 frame (4.8 mm pixels) lets the pose drift to a
        neighbouring vertebra (see :func:`effective_levels`).
    reference_pixel_mrad : float
        Angle subtended by one pixel (1000 / fx) of the frames the levels are meant for.
    max_iterations : tuple of int
        Maximum updates per level.
    in_plane_iterations : int
        First updates at the coarsest level with in-plane motion only (rotation about the
        principal ray, image-plane translation): the best observed degrees of freedom.
    no_depth_iterations : int
        Following updates at the coarsest level without depth motion.
    search_px : tuple of int
        NGC search range per level, pixels of that level.
    patch_half : int
        NGC patch half-size, pixels.
    max_cos : float
        Contour selection threshold on ``|cos(gradient, ray)|``.
    cell_px : float
        One contour point per cell of this size (pixels of the level).
    max_points : int
        Cap on contour points per update.
    ngc_min : float
        Correspondences with lower NGC get weight 0.
    robust : str
        ``mccr`` or ``none``.
    lam : float
        Regulariser weight of the least squares.
    stop_rot_deg, stop_trans_mm : float
        A level ends when an update's rotation and translation are both below these.
    smooth_sigma_px : float
        Gaussian smoothing of both images before the gradient, pixels.
    inlier_px : float
        Residual bound (pixels at the point's depth) for the confidence's inlier count.
    patch_half_along : int
        NGC patch half-size along the contour (``patch_half`` is across it).
    prior_rot_deg, prior_trans_mm : float, tuple
        Standard deviations of the zero-mean Gaussian prior on one update (rotation; optical
        x, y, z translation). With a per-correspondence noise of one pixel at the points' depth
        this sets the MAP regulariser of :func:`.solver.solve_ppc`.
    max_step_px : float
        Trust region: an update may move the contour points by at most this many times the
        search range (in mm at their depth); longer steps are scaled down.
    joint_ngc : bool
        Joint normalised correlation of both gradient components (see :func:`.matching.ngc_search`).
    min_moving_grad : float
        Salient points only: drop contour points where the moving gradient magnitude is below
        this fraction of its 95th percentile over the contour points (0 keeps all).
    anchor_rot_deg, anchor_trans_mm : tuple
        Standard deviations (optical x, y, z axes) of a Gaussian prior on the total motion away
        from the start pose. A single view barely observes depth (0.1 % of apparent size is
        several mm of depth) and rotations about image-plane axes, so small appearance
        differences would otherwise drag them far; the in-plane degrees of freedom are left
        almost free. ``None`` entries (or an empty tuple) disable the anchor.
    learned_levels : tuple of float
        Nominal levels (entries of ``levels``) whose updates are weighted by the learned
        correspondence weighting (PPC-L, :mod:`reg2d3d_ros.ppcl`) instead of NGC + MCCR; at those levels
        there is no in-plane / no-depth phase and no anchor (the network was trained without
        them). Empty: classic PPC. ``PPCL_PLUS_CONFIG`` learns at the coarse levels only.
    flow_levels : tuple of float
        Nominal levels whose updates use the PPC Flow (Attention) operator (:mod:`reg2d3d_ros.ppcflow`): the
        flow network's correspondences and (with attention) its weights, no NGC search.
    learned_as_prior : bool
        Use the learned weights as the prior weights of the classic update instead of replacing
        it: MCCR, the anchor and the trust region stay on (a hybrid; see the PPC-L report).
    search_range_mm : float
        Global in-plane search before the iterations (:mod:`.search`): largest image-plane shift
        searched, mm at the target's depth; 0 disables it (the local PPC of the seed).
    search_angles_deg : tuple of float
        Rotations about the principal ray tried by the search, degrees.
    search_candidates : int
        Candidates of the search that run the coarsest level, besides the start itself.
    search_keep : int
        How many starts run the remaining levels: the given start always, and the candidates
        with the highest inlier fraction after the coarsest level.
    search_margin : float
        A candidate's result replaces the start's only if its final inlier fraction is higher
        by more than this (a start near the truth must not lose to a neighbouring vertebra).
    search_margin_gc : float
        ... and its gradient correlation with the frame (:func:`.search.pose_gradient_correlation`)
        is higher by more than this too. On the tuning cases this kept the success rate and cut
        the results more than 10 mm off from 9 to 7 of 60 (512 px) and 23 to 16 of 72 (256 px);
        a start at the ground truth of T9 AP no longer moved to the neighbour.
    polish_levels : tuple of float
        Resolution factors of the polish (see the module doc), for frames with the reference
        pixel size (coarser frames scale them up, as the PPC levels); empty: no polish.
    polish_iterations : tuple of int
        Gradient iterations per polish level.
    polish_dof : tuple of 6 bool
        Degrees of freedom the polish may change (rotation x, y, z, translation x, y, z in the
        optical frame; :data:`reg2d3d_ros.intensity.ALL_DOF` by default). Without depth
        (``NO_DEPTH_DOF``) the polish cannot trade the target's apparent size for a small
        gain in correlation: on the benchmark's tuning frames the all-DoF polish moved true
        starts 9-20 mm in depth while the reprojection error stayed under 1 mm.
    polish_max_mm : float
        A polish that moves the target's surface points by more than this on average (mm) is
        discarded (the PPC pose is kept), as is one that does not raise the gradient correlation.
    guard : bool
        Accept a PPC update only if it does not lower the gradient correlation of the moving
        image with the frame (:class:`.search.GradientCorrelation`); otherwise try half the
        step, then an in-plane-only update, and keep the pose if neither is better (see the
        module doc). Off: the seed's fixed-point iteration.
    guard_level : float
        Resolution factor of the guard's gradient correlation (for frames with the reference
        pixel size); the coarsest level uses its own factor when that is smaller.
    guard_patience : int
        A level ends after this many consecutive rejected updates.
    search_select : str
        How the in-plane search's starts are compared: ``inliers`` (the inlier fraction, with
        ``search_margin`` and ``search_margin_gc``, see :meth:`PPCRegistrator.register`) or
        ``gc`` (needs ``guard``): the candidates with the highest gradient correlation after the
        coarsest level go on, and the result with the highest one wins; a candidate replaces
        the start only if it is higher by more than ``search_margin_gc`` times the start's (a
        relative margin: the level of the correlation changes with the frame's physics).
    """

    levels: tuple = (0.25, 0.5, 1.0)
    reference_pixel_mrad: float = 1000.0 * 0.6 / 1020.0
    max_iterations: tuple = (8, 8, 6)
    in_plane_iterations: int = 4
    no_depth_iterations: int = 2
    search_px: tuple = (6, 6, 4)
    patch_half: int = 2
    max_cos: float = 0.15
    cell_px: float = 1.0
    max_points: int = 1500
    ngc_min: float = 0.1
    robust: str = "mccr"
    lam: float = 0.0
    stop_rot_deg: float = 0.02
    stop_trans_mm: float = 0.02
    smooth_sigma_px: float = 1.0
    inlier_px: float = 2.0
    patch_half_along: int = 6
    prior_rot_deg: float = 1.0
    prior_trans_mm: tuple = (10.0, 10.0, 10.0)
    max_step_px: float = 1.5
    joint_ngc: bool = True
    min_moving_grad: float = 0.0
    anchor_rot_deg: tuple = (3.0, 3.0, 30.0)
    anchor_trans_mm: tuple = (100.0, 100.0, 10.0)
    learned_levels: tuple = ()
    flow_levels: tuple = ()
    learned_as_prior: bool = False
    search_range_mm: float = 0.0
    search_angles_deg: tuple = (-10.0, -5.0, 0.0, 5.0, 10.0)
    search_candidates: int = 3
    search_keep: int = 3
    search_margin: float = 0.03
    search_margin_gc: float = 0.02
    polish_levels: tuple = ()
    polish_iterations: tuple = (15, 10)
    polish_dof: tuple = (True, True, True, True, True, True)
    polish_max_mm: float = 5.0
    guard: bool = False
    guard_level: float = 0.5
    guard_patience: int = 2
    search_select: str = "inliers"

    def __post_init__(self):
        n = len(self.levels)
        if n == 0 or len(self.max_iterations) != n or len(self.search_px) != n:
            raise ConfigError("levels, max_iterations and search_px must have the same, non-zero length")
        if any(s <= 0 for s in self.levels):
            raise ConfigError("levels must be positive resolution factors")
        if set(self.learned_levels) & set(self.flow_levels):
            raise ConfigError("a level cannot use both the PPC-L weighting and the flow operator")
        if self.polish_levels and len(self.polish_iterations) != len(self.polish_levels):
            raise ConfigError("polish_levels and polish_iterations must have the same length")
        if any(s <= 0 for s in self.polish_levels) or self.polish_max_mm <= 0:
            raise ConfigError("polish_levels and polish_max_mm must be positive")
        if self.search_select not in ("inliers", "gc"):
            raise ConfigError(f"search_select must be 'inliers' or 'gc', not {self.search_select!r}")
        if self.search_select == "gc" and not self.guard:
            raise ConfigError("search_select 'gc' compares the guard's gradient correlations: it needs guard=True")
        if self.guard_level <= 0 or self.guard_patience < 1:
            raise ConfigError("guard_level must be positive and guard_patience at least 1")


def effective_levels(config: PPCConfig, intrinsics: CArmIntrinsics) -> list:
    """``[(resolution factor, max iterations, search px), ...]`` of a configuration for a frame.

    Frames with coarser pixels than ``config.reference_pixel_mrad`` scale the factors up by the
    ratio (capped at 1); consecutive levels that coincide are merged, keeping the finer one's
    iterations and search range. Finer frames use the factors as they are.
    """
    return [lv[:3] for lv in _levels(config, intrinsics)]


def _levels(config: PPCConfig, intrinsics: CArmIntrinsics) -> list:
    """:func:`effective_levels` with the nominal level each one stands for as a fourth entry."""
    pixel_mrad = 1000.0 / float(intrinsics.fx)
    scale = max(1.0, pixel_mrad / config.reference_pixel_mrad)
    out = []
    for s, n, r in zip(config.levels, config.max_iterations, config.search_px):
        f = min(1.0, s * scale)
        f = 1.0 if abs(f - 1.0) < 1e-6 else f
        if out and abs(out[-1][0] - f) < 1e-6:
            out[-1] = (f, n, r, s)
        else:
            out.append((f, n, r, s))
    return out


#: Tracking: one full-resolution, in-plane update per frame (rotation about the principal ray and
#: image-plane translation), from the previous frame's pose. Depth and out-of-plane rotation keep
#: the values of the last registration: between frames they change little, they hardly move the
#: projection, and the image observes them too weakly to update them frame by frame without
#: drifting (on the tuning sequences, median mRPD 0.57 / 0.99 mm in-plane vs 1.47 / 5.16 mm with
#: all six degrees of freedom). Coarser levels also drifted; more updates did not help.
TRACKING_CONFIG = PPCConfig(levels=(1.0,), max_iterations=(1,), in_plane_iterations=1, no_depth_iterations=0, search_px=(4,))

#: The classic recipe of Wang et al. (TMI 2017) as described in the seed: NGC weights, MCCR,
#: three levels, no depth motion first at the coarsest level, no anchor prior, no in-plane phase.
WANG_CONFIG = PPCConfig(in_plane_iterations=0, no_depth_iterations=4, anchor_rot_deg=(), anchor_trans_mm=())

#: PPC-L: the learned correspondence weighting at every level (needs a loaded model).
PPCL_CONFIG = PPCConfig(learned_levels=(0.25, 0.5, 1.0))

#: PPC-L+: learned weighting at the coarse levels, classic PPC (NGC + MCCR) at the finest, as in
#: the seed (the classic solver is the more accurate one once the pose is close).
PPCL_PLUS_CONFIG = PPCConfig(learned_levels=(0.25, 0.5))

#: PPC-L+ hybrid: the learned weights at the coarse levels serve as prior weights of the classic
#: update (MCCR, anchor and trust region kept); pure learned updates drift when iterated (see
#: reports/ppcl/report.md).
PPCL_HYBRID_CONFIG = PPCConfig(learned_levels=(0.25, 0.5), learned_as_prior=True)


@dataclass
class RegistrationResult:
    """Outcome of a registration or tracking update.

    Attributes
    ----------
    T_optical_from_ct : torch.Tensor
        ``(4, 4)`` float64 estimate, mm.
    iterations : int
        Updates performed (all levels).
    inlier_fraction : float
        Confidence: fraction of contour correspondences that are inliers (see module doc).
    mean_ngc : float
        Mean NGC of the inliers.
    residual_rms_mm : float
        Weighted RMS point-to-plane residual of the last update, mm.
    n_correspondences : int
        Contour points used in the last update.
    seconds : float
        Wall time.
    history : list of dict
        Per update: level, rotation (deg) and translation (mm) of the update, points, inliers
        (and, with the in-plane search, the candidate it refined).
    candidate : int
        Which start the result came from: 0 the given one, ``k >= 1`` the in-plane search's k-th.
    gradient_correlation : float or None
        :func:`.search.pose_gradient_correlation` of the PPC result (before any polish), when
        the registration computed it (the in-plane search's selection and the guard do; the
        guard's is at ``min(last level, guard_level)``); else None.
    polish : dict
        With ``polish_levels``: ``T_before`` (the PPC pose, ``(4, 4)``), ``moved_mm`` (mean
        displacement of the surface points), ``kept`` (False when discarded), ``similarity``
        and ``seconds``; empty otherwise.
    """

    T_optical_from_ct: torch.Tensor
    iterations: int
    inlier_fraction: float
    mean_ngc: float
    residual_rms_mm: float
    n_correspondences: int
    seconds: float
    history: list = field(default_factory=list)
    candidate: int = 0
    gradient_correlation: float | None = None
    polish: dict = field(default_factory=dict)


class _Guard:
    """Gradient-correlation scores of one frame per guard resolution (see ``PPCConfig.guard``)."""

    def __init__(self, registrator, image_att, intrinsics: CArmIntrinsics, level: float):
        self._args = (registrator, image_att, intrinsics)
        self.level = float(level)
        self._scores = {}

    def at(self, nominal: float):
        """The :class:`.search.GradientCorrelation` used at a nominal PPC level (``min(level, guard level)``)."""
        from .search import GradientCorrelation

        s = min(float(nominal), self.level)
        if s not in self._scores:
            self._scores[s] = GradientCorrelation(*self._args, level=s)
        return self._scores[s]

    @property
    def evaluations(self) -> int:
        """Poses scored so far, at every resolution."""
        return sum(g.evaluations for g in self._scores.values())


class PPCRegistrator:
    """Classic PPC registration of X-ray frames to one structure of a CT.

    Parameters
    ----------
    roi : CTVolume
        The CT cropped around the target structure (its physical frame is the CT's).
    surface : SurfacePoints
        Surface points of the target (CT frame).
    config : PPCConfig
        Default parameters of :meth:`register`.
    region : np.ndarray, optional
        ``(D, H, W)`` bool region of the target in ``roi`` (see :func:`target_attenuation`).
    floor_hu : float, optional
        Bone floor of the moving image (default :data:`BONE_FLOOR_HU`).
    drr_step_mm : float, optional
        Ray-casting step of the moving image; default twice the smallest voxel spacing (the
        projection of the target changes by NCC < 1e-4, at half the cost).
    dtype : torch.dtype
        Geometry dtype (float64 recommended); the renderer uses float32.
    learned : LearnedWeighting, optional
        PPC-L weighting networks, used at the configuration's ``learned_levels``.
    flow : FlowOperator, optional
        PPC Flow (Attention) operator, used at the configuration's ``flow_levels``.
    """

    def __init__(self, roi, surface: SurfacePoints, config: PPCConfig = PPCConfig(), region: np.ndarray | None = None,
                 floor_hu: float | None = None, drr_step_mm: float | None = None, dtype=torch.float64, learned=None, flow=None):
        #: learned correspondence weighting (:class:`reg2d3d_ros.ppcl.LearnedWeighting`), used at ``config.learned_levels``
        self.learned = learned
        #: learned flow update operator (:class:`reg2d3d_ros.ppcflow.FlowOperator`), used at ``config.flow_levels``
        self.flow = flow
        if len(surface) < 50:
            raise ConfigError(f"only {len(surface)} surface points: the target has too few edges for PPC")
        self.roi = roi
        self.surface = surface
        self.config = config
        self.region = region
        self._floor_hu = floor_hu
        self._polisher = None
        self._fixed_cache = None  # (frame, {level: gradient}) of the last frame (fixed_gradients)
        self.dtype = dtype
        floor = BONE_FLOOR_HU if floor_hu is None else floor_hu
        mu = target_attenuation(roi, region, floor_hu=floor)
        # render only the support of the target's attenuation (empty space still costs samples)
        nz = np.argwhere(mu > 1e-6)
        if len(nz) == 0:
            raise ConfigError("the target has no bone above the floor: nothing to register")
        lo, hi = nz.min(axis=0), nz.max(axis=0) + 1
        tight = roi.crop_ijk(lo[::-1], hi[::-1])
        mu = np.ascontiguousarray(mu[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]])
        step = 2.0 * float(roi.spacing_mm.min()) if drr_step_mm is None else drr_step_mm
        self.renderer = DRRRenderer(torch.from_numpy(mu), tight.T_ct_from_ijk, step_mm=step)
        self.pts = torch.as_tensor(surface.pts_ct_mm, dtype=dtype)
        self.normals = torch.as_tensor(surface.normals_ct, dtype=dtype)
        self._generator = torch.Generator().manual_seed(0)

    @classmethod
    def from_ct(cls, ct, label, margin_mm: float = 15.0, config: PPCConfig = PPCConfig(), surface_kwargs=None,
                moving: str = "target", **kwargs) -> "PPCRegistrator":
        """Registrator for one labelled structure (e.g. ``"T8"``) of a CT with a label map.

        Parameters
        ----------
        moving : str
            What the moving image (the DRR whose gradients are matched) shows: ``"target"``, the
            target's bone only (the dilated label, tapered); ``"roi"``, all bone of the crop
            around it (``margin_mm``), neighbouring vertebrae and ribs included, as they also
            appear in the X-ray next to the target's edges. The contour points are the target's in
            both cases. (Measured on the tuning cases: see the closing note of the PPC issue.)
        kwargs
            Go to the constructor (``floor_hu``, ``drr_step_mm``, ``dtype``, ``learned``, ``flow``).
        """
        from ..volume import resolve_label

        if moving not in ("target", "roi"):
            raise ConfigError(f"moving must be 'target' or 'roi', not {moving!r}")
        lid = resolve_label(label, ct.label_names)
        roi = ct.crop_to_labels([lid], margin_mm=margin_mm)
        region = structure_region(roi, [lid], dilation_mm=3.0)
        surface = canny_surface_points(roi, region=region, **(surface_kwargs or {}))
        return cls(roi, surface, config, region=region if moving == "target" else None, **kwargs)

    # -------------------------------------------------------------------------------------
    def fixed_gradients(self, image_att, levels) -> dict:
        """Smoothed gradient images ``{level: (2, h, w)}`` float32 of an attenuation-like frame ``(H, W)``.

        The gradients of the last frame are kept: the registration, the in-plane search, the
        peak check and the acceptance checks of one frame (the same ``image_att`` object, not
        modified in between) compute each level once.
        """
        cached = self._fixed_cache
        if cached is None or cached[0] is not image_att:
            cached = self._fixed_cache = (image_att, {})
        out = {}
        img = None
        for s in levels:
            if s not in cached[1]:
                if img is None:
                    img = torch.as_tensor(np.asarray(image_att, dtype=np.float32))
                small = downsample(img[None], s)[0] if s != 1.0 else img
                cached[1][s] = gradient_image(small.to(torch.float32), self.config.smooth_sigma_px)
            out[s] = cached[1][s]
        return out

    def moving_gradient(self, T: torch.Tensor, intr: CArmIntrinsics, around_uv: torch.Tensor | None = None) -> torch.Tensor:
        """Smoothed gradient ``(2, h, w)`` of the region's DRR at pose ``T`` for ``intr``.

        With ``around_uv`` (``(N, 2)`` pixel positions, e.g. the projected contour points) only
        the rays in a band around those points are cast (:meth:`band_radius_px`): the gradient
        is then exact wherever the NGC templates sample it (within the band minus the filter
        support) and meaningless elsewhere. This is what the tracking update needs, at a
        fraction of the rays of the whole frame.
        """
        K = intr.K(self.dtype)
        with torch.no_grad():
            if around_uv is None or len(around_uv) == 0:
                drr = self.renderer.render(T[None], K, intr.height, intr.width).line_integral[0]
            else:
                mask = band_mask(around_uv, intr.height, intr.width, self.band_radius_px())
                pix = mask.reshape(-1).nonzero()[:, 0]
                uv = torch.stack([pix % intr.width, pix // intr.width], dim=-1).to(self.dtype)
                d = torch.cat([uv, torch.ones_like(uv[:, :1])], dim=-1) @ torch.linalg.inv(K).T
                d = d / torch.linalg.norm(d, dim=-1, keepdim=True)
                # float32 geometry: ray positions to ~1e-4 mm, and half the arithmetic of float64
                li = self.renderer.render_rays(T[None].float(), d[None].float()).line_integral[0]
                drr = li.new_zeros(intr.height * intr.width).index_put((pix,), li).reshape(intr.height, intr.width)
        return gradient_image(drr, self.config.smooth_sigma_px)

    def band_radius_px(self) -> int:
        """Half-width of the rendered band around contour points (see :meth:`moving_gradient`), pixels.

        The farthest NGC template sample (``hypot(patch_half, patch_half_along)``), its bilinear
        neighbour, the Sobel support and the Gaussian smoothing support (``3 sigma``).
        """
        cfg = self.config
        smooth = max(1, int(round(3 * cfg.smooth_sigma_px))) if cfg.smooth_sigma_px > 0 else 0
        return int(math.ceil(math.hypot(cfg.patch_half, cfg.patch_half_along))) + 1 + 1 + smooth + 1

    def correspond(self, T: torch.Tensor, grad_fixed: torch.Tensor, intr: CArmIntrinsics, search_px: int,
                   config: PPCConfig | None = None) -> Correspondences:
        """Contour points at pose ``T`` and their NGC correspondences in the frame (steps 1-3)."""
        cfg = config or self.config
        c, grad_moving = self.contours_at(T, intr, cfg, whole_image=False)
        K = intr.K(self.dtype)
        if len(c) == 0:
            z = c.uv.new_zeros(0)
            return Correspondences(c, c.uv.clone(), z, z, z.bool(), K, search_px)
        uv_corr, score, shift, at_limit = ngc_search(
            grad_fixed.to(self.dtype), grad_moving.to(self.dtype), c.uv, c.normal_2d, search_px, cfg.patch_half,
            cfg.patch_half_along, joint=cfg.joint_ngc,
        )
        return Correspondences(c, uv_corr, score, shift, at_limit, K, search_px)

    def contours_at(self, T: torch.Tensor, intr: CArmIntrinsics, config: PPCConfig | None = None, whole_image: bool = True):
        """``(Contours, moving gradient (2, h, w))`` at pose ``T`` for a level's intrinsics (steps 1-2).

        ``whole_image=False`` renders the moving image only in a band around the contour points
        (enough for NGC matching, see :meth:`moving_gradient`); a matcher that looks at the whole
        image (the flow network) needs ``True``.
        """
        cfg = config or self.config
        K = intr.K(self.dtype)
        c = select_contours(
            self.pts, self.normals, T, K, intr.height, intr.width,
            max_cos=cfg.max_cos, cell_px=cfg.cell_px, margin_px=cfg.patch_half + 1,
            max_points=cfg.max_points, generator=self._generator,
        )
        grad_moving = self.moving_gradient(T, intr, None if whole_image else c.uv)
        if cfg.min_moving_grad > 0 and len(c):
            from .matching import _sample

            gm = torch.linalg.norm(_sample(grad_moving.to(self.dtype), c.uv), dim=0)
            keep = gm >= cfg.min_moving_grad * torch.quantile(gm, 0.95)
            c = Contours(c.index[keep], c.w_opt[keep], c.g_opt[keep], c.uv[keep], c.normal_2d[keep])
        return c, grad_moving

    def update(self, T: torch.Tensor, grad_fixed: torch.Tensor, intr: CArmIntrinsics, search_px: int, dof_mask=None,
               config: PPCConfig | None = None, T_anchor: torch.Tensor | None = None, weighter=None, matcher=None):
        """One PPC update at one level; returns ``(T_new, stats)``.

        ``T_anchor`` is the pose the anchor prior (``config.anchor_*``) pulls towards. A
        ``weighter`` (a callable ``Correspondences -> (N,) weights``, e.g. PPC-L's PointNet)
        replaces the NGC weighting and MCCR, and neither the anchor nor the trust region
        (``max_step_px``) is applied (as in training). A
        ``matcher`` (a callable ``(Contours, grad_fixed, grad_moving, K, search_px) -> Correspondences``,
        e.g. the PPC Flow network) replaces the NGC search.
        """
        cfg = config or self.config
        if matcher is None:
            corr = self.correspond(T, grad_fixed, intr, search_px, cfg)
        else:
            c0, grad_moving = self.contours_at(T, intr, cfg)
            corr = matcher(c0, grad_fixed, grad_moving, intr.K(self.dtype), search_px)
        c, uv_corr, score, at_limit, K = corr.contours, corr.uv_corr, corr.score, corr.at_limit, corr.K
        stats = {"points": len(c)}
        if len(c) < 12:
            stats.update(rot_deg=0.0, trans_mm=0.0, inliers=0, mean_ngc=0.0, residual_rms_mm=float("inf"))
            return T, stats
        ngc_ok = (score >= cfg.ngc_min) & ~at_limit
        hybrid = weighter is not None and cfg.learned_as_prior
        if weighter is not None:
            weights = weighter(corr).to(self.dtype)
            robust = cfg.robust if hybrid else "none"
        else:
            weights = torch.where(ngc_ok, score, torch.zeros_like(score))
            robust = cfg.robust
        if int((weights > 0).sum()) < 12:
            stats.update(rot_deg=0.0, trans_mm=0.0, inliers=0, mean_ngc=float(score.mean()), residual_rms_mm=float("inf"))
            return T, stats
        mm_per_px = c.w_opt[:, 2] / K[0, 0]
        noise_mm = float(mm_per_px.mean())
        precision = update_prior_precision(cfg, noise_mm, self.dtype)
        anchor_p = anchor_d = None
        if (weighter is None or hybrid) and T_anchor is not None and cfg.anchor_rot_deg and cfg.anchor_trans_mm:
            sig = torch.tensor([math.radians(a) for a in cfg.anchor_rot_deg] + list(cfg.anchor_trans_mm), dtype=self.dtype)
            anchor_p = noise_mm**2 / sig**2
            anchor_d = deviation_about(T, T_anchor, weighted_centroid(c.w_opt[None], weights[None])[0])
        sol = solve_ppc(
            c.w_opt[None], c.g_opt[None], uv_corr[None], K, weights[None], lam=cfg.lam, dof_mask=dof_mask,
            robust=robust, prior_precision=precision, anchor_precision=anchor_p, anchor_offset=anchor_d,
        )
        dv = sol.dv[0]
        # trust region: largest displacement of a contour point under the update
        disp = torch.linalg.norm(torch.linalg.cross(dv[:3].expand_as(c.w_opt), c.w_opt - sol.center[0], dim=-1) + dv[3:], dim=-1)
        limit = cfg.max_step_px * search_px * noise_mm
        # learned updates were trained without a trust region (their step is part of what they learned)
        step_scale = 1.0 if (weighter is not None and not hybrid) else min(1.0, limit / max(float(disp.max()), 1e-12))
        if step_scale < 1.0:
            dv = dv * step_scale
        T_new = motion_about(dv[None], sol.center)[0] @ T
        res = sol.residual_mm[0]
        # the confidence is the same for every weighting: NGC-accepted points that fit the motion
        inl = ngc_ok & (res.abs() < cfg.inlier_px * mm_per_px)
        wsum = float(sol.weights[0].sum())
        stats.update(
            step_scale=step_scale,
            rot_deg=math.degrees(float(dv[:3].norm())),
            trans_mm=float(dv[3:].norm()),
            inliers=int(inl.sum()),
            mean_ngc=float(score[inl].mean()) if bool(inl.any()) else 0.0,
            residual_rms_mm=float(torch.sqrt((sol.weights[0] * res**2).sum() / max(wsum, 1e-12))),
            learned=weighter is not None,
        )
        return T_new, stats

    def register(self, image_att, intrinsics: CArmIntrinsics, T_init, config: PPCConfig | None = None) -> RegistrationResult:
        """Register one frame starting from ``T_init``.

        With ``config.search_range_mm > 0`` the start is first corrected by the global in-plane
        search (:func:`.search.inplane_search`): the start and the search's candidates each run
        the coarsest level; the start and the ``search_keep - 1`` candidates with the highest
        inlier fraction run the remaining levels; a candidate's result is returned instead of
        the start's only if its final inlier fraction is higher by more than ``search_margin``.

        Parameters
        ----------
        image_att : np.ndarray or torch.Tensor
            ``(H, W)`` attenuation-like frame (bright = bone), see :func:`reg2d3d_ros.images.to_attenuation`.
        intrinsics : CArmIntrinsics
            Camera of the frame (its size must match the frame).
        T_init : torch.Tensor
            ``(4, 4)`` start pose ``T_optical_from_ct``, mm.
        config : PPCConfig, optional
            Overrides the registrator's default configuration.
        """
        cfg = config or self.config
        t0 = time.perf_counter()
        h, w = np.asarray(image_att).shape[-2:]
        if (h, w) != (intrinsics.height, intrinsics.width):
            raise ConfigError(f"frame is {w}x{h} but the intrinsics are {intrinsics.width}x{intrinsics.height}")
        T = torch.as_tensor(T_init, dtype=self.dtype).clone()
        levels = _levels(cfg, intrinsics)
        if cfg.learned_levels and self.learned is None:
            raise ConfigError("this configuration uses learned correspondence weighting (PPC-L) but no PPC-L model is loaded")
        if cfg.flow_levels and self.flow is None:
            raise ConfigError("this configuration uses the PPC Flow operator but no flow model is loaded")
        fixed = self.fixed_gradients(image_att, [lv[0] for lv in levels])
        guard = _Guard(self, image_att, intrinsics, cfg.guard_level) if cfg.guard else None
        if cfg.search_range_mm > 0:
            from .search import inplane_search

            found = inplane_search(self, image_att, intrinsics, T, range_mm=cfg.search_range_mm, angles_deg=cfg.search_angles_deg,
                                   level=min(1.0, levels[0][0]), n_candidates=cfg.search_candidates)
            starts = [T] + [c.T_optical_from_ct for c in found]
            runs = [self._run_levels(fixed, intrinsics, levels[:1], 0, Ts, Ts, cfg, candidate=k, guard=guard) for k, Ts in enumerate(starts)]
            history = [st for r in runs for st in r["history"]]
            iterations = sum(r["iterations"] for r in runs)
            # the start always goes on (a good start must not lose to a neighbour's look-alike),
            # with the best of the search's candidates after the coarsest level
            key = "gc" if cfg.search_select == "gc" else "inlier_fraction"
            kept = [runs[0]] + sorted(runs[1:], key=lambda r: -r[key])[: max(0, cfg.search_keep - 1)]
            if len(levels) > 1:
                kept = [self._continue(fixed, intrinsics, levels, r, cfg, guard=guard) for r in kept]
                history += [st for r in kept for st in r["history"]]
                iterations += sum(r["iterations"] for r in kept)
            best = kept[0]
            challenger = max(kept[1:], key=lambda r: r[key], default=None)
            if cfg.search_select == "gc":
                if challenger is not None and challenger["gc"] > best["gc"] + cfg.search_margin_gc * abs(best["gc"]):
                    best = challenger
            elif challenger is not None and challenger["inlier_fraction"] > best["inlier_fraction"] + cfg.search_margin:
                from .search import pose_gradient_correlation

                for r in (best, challenger):
                    r["gc"] = pose_gradient_correlation(self, image_att, intrinsics, r["T"])
                if challenger["gc"] > best["gc"] + cfg.search_margin_gc:
                    best = challenger
        else:
            best = self._run_levels(fixed, intrinsics, levels, 0, T, T, cfg, guard=guard)
            history, iterations = best["history"], best["iterations"]
        last = best["last"]
        polish = self.polish(image_att, intrinsics, best["T"], cfg) if cfg.polish_levels else {}
        return RegistrationResult(
            T_optical_from_ct=polish["T"] if polish.get("kept") else best["T"],
            iterations=iterations,
            inlier_fraction=best["inlier_fraction"],
            mean_ngc=last.get("mean_ngc", 0.0),
            residual_rms_mm=last.get("residual_rms_mm", float("inf")),
            n_correspondences=last.get("points", 0),
            seconds=time.perf_counter() - t0,
            history=history,
            candidate=best["candidate"],
            gradient_correlation=best.get("gc"),
            polish={k: v for k, v in polish.items() if k != "T"},
        )

    def polish(self, image_att, intrinsics: CArmIntrinsics, T: torch.Tensor, config: PPCConfig | None = None) -> dict:
        """Gradient-correlation polish of a pose (see the module doc); returns a dict.

        Keys: ``T`` (the polished pose, ``(4, 4)`` float64), ``T_before`` (``T``), ``moved_mm``
        (mean displacement of the surface points, mm), ``kept`` (``moved_mm <= polish_max_mm`` and
        the gradient correlation rose), ``similarity`` (the polisher's gradient correlation at the
        polished pose, its finest level), ``gc_before`` / ``gc_after``
        (:class:`.search.GradientCorrelation` at ``guard_level``) and ``seconds``.
        """
        from ..intensity import IntensityConfig, IntensityRegistrator

        cfg = config or self.config
        t0 = time.perf_counter()
        if self._polisher is None:
            self._polisher = IntensityRegistrator(self.roi, region=self.region, floor_hu=self._floor_hu, dtype=self.dtype)
        scale = max(1.0, (1000.0 / float(intrinsics.fx)) / cfg.reference_pixel_mrad)
        levels, iters = [], []
        for s, n in zip(cfg.polish_levels, cfg.polish_iterations):
            f = min(1.0, s * scale)
            if levels and abs(levels[-1] - f) < 1e-6:
                iters[-1] = int(n)
            else:
                levels.append(f)
                iters.append(int(n))
        icfg = IntensityConfig(metric="gc", levels=tuple(levels), iterations=tuple(iters), lr_rot_rad=0.006, lr_trans_mm=0.6,
                               patience=5, mask_margin_mm=10.0, dof=tuple(cfg.polish_dof))
        T = torch.as_tensor(T, dtype=self.dtype)
        r = self._polisher.register(image_att, intrinsics, T, config=icfg)
        T_new = r.T_optical_from_ct.to(self.dtype)
        moved = float(torch.linalg.norm((self.pts @ (T_new[:3, :3] - T[:3, :3]).T) + (T_new[:3, 3] - T[:3, 3]), dim=-1).mean())
        from .search import GradientCorrelation

        score = GradientCorrelation(self, image_att, intrinsics, level=cfg.guard_level)
        gc_before, gc_after = score(T), score(T_new)
        return {"T": T_new, "T_before": T, "moved_mm": moved, "kept": moved <= cfg.polish_max_mm and gc_after > gc_before,
                "similarity": r.similarity, "gc_before": gc_before, "gc_after": gc_after, "seconds": time.perf_counter() - t0}

    def _continue(self, fixed: dict, intrinsics: CArmIntrinsics, levels: list, run: dict, cfg: PPCConfig, guard=None) -> dict:
        """The levels after the first, from the outcome of :meth:`_run_levels` over the first."""
        return self._run_levels(fixed, intrinsics, levels[1:], 1, run["T"], run["T_anchor"], cfg, candidate=run["candidate"], guard=guard)

    def _run_levels(self, fixed: dict, intrinsics: CArmIntrinsics, levels: list, first_index: int, T: torch.Tensor, T_anchor: torch.Tensor, cfg: PPCConfig,
                    candidate: int = 0, guard=None) -> dict:
        """The iterations of ``levels`` (entries of :func:`_levels`; ``first_index``: index of the first in the full list).

        ``candidate`` (which start this is, see :meth:`register`) is recorded in every update's stats.
        ``guard`` (a :class:`_Guard`, with ``config.guard``) judges every update by the gradient
        correlation; the returned ``gc`` is the score of the final pose at the last level's guard
        resolution (None without a guard).
        """
        history, iterations, last, gc = [], 0, {}, None
        for li, (s, n_iter, search, nominal) in enumerate(levels, start=first_index):
            intr = intrinsics.scaled(s)
            learned = any(abs(nominal - x) < 1e-6 for x in cfg.learned_levels)
            weighter = self.learned.weighter(nominal) if learned else None
            matcher = None
            if any(abs(nominal - x) < 1e-6 for x in cfg.flow_levels):
                learned = True
                matcher, weighter = self.flow.matcher(), self.flow.weighter()
            score = None if guard is None else guard.at(nominal)
            gc = None if score is None else score(T)
            rejected = 0
            for it in range(n_iter):
                mask = None
                if learned:
                    pass
                elif li == 0 and it < cfg.in_plane_iterations:
                    mask = IN_PLANE
                elif li == 0 and it < cfg.in_plane_iterations + cfg.no_depth_iterations:
                    mask = NO_DEPTH
                T_new, stats = self.update(T, fixed[s], intr, search, dof_mask=mask, config=cfg, T_anchor=T_anchor, weighter=weighter, matcher=matcher)
                iterations += 1
                stats.update(level=s, iteration=it, depth_frozen=mask is not None, candidate=candidate)
                history.append(stats)
                last = stats
                if stats["points"] == 0:
                    break
                step = 1.0
                if score is not None:
                    T_new, gc_new, step = self._guarded(T, T_new, gc, score, fixed[s], intr, search, mask, cfg, T_anchor, weighter, matcher)
                    stats.update(accepted=step > 0, step=step, gradient_correlation=gc_new)
                    if step == 0:  # no better pose: keep T (its correspondences are in ``last``)
                        rejected += 1
                        if rejected >= cfg.guard_patience:
                            break
                        continue
                    rejected, gc = 0, gc_new
                T = T_new
                if step > 0 and mask is None and stats["rot_deg"] * step < cfg.stop_rot_deg and stats["trans_mm"] * step < cfg.stop_trans_mm:
                    break
        points = max(last.get("points", 0), 1)
        return dict(T=T, T_anchor=T_anchor, history=history, iterations=iterations, last=last, inlier_fraction=last.get("inliers", 0) / points,
                    candidate=candidate, gc=gc)

    def _guarded(self, T, T_new, gc, score, grad_fixed, intr, search, mask, cfg, T_anchor, weighter, matcher):
        """``(pose, its score, step)`` of a guarded update: ``step`` 1 (the update), 0.5 (half of it), -1 (in-plane only) or 0 (none better than ``gc``)."""
        from ..geometry.se3 import invert_transform, se3_exp, se3_log

        gc_new = score(T_new)
        if gc_new >= gc:
            return T_new, gc_new, 1.0
        T_half = se3_exp(0.5 * se3_log(T_new @ invert_transform(T))) @ T
        gc_half = score(T_half)
        if gc_half >= gc:
            return T_half, gc_half, 0.5
        if mask is not IN_PLANE:
            T_in, _ = self.update(T, grad_fixed, intr, search, dof_mask=IN_PLANE, config=cfg, T_anchor=T_anchor, weighter=weighter, matcher=matcher)
            gc_in = score(T_in)
            if gc_in >= gc:
                return T_in, gc_in, -1.0
        return T, gc, 0.0

    def track(self, image_att, intrinsics: CArmIntrinsics, T_prev, config: PPCConfig = TRACKING_CONFIG) -> RegistrationResult:
        """Tracking update: register a frame starting from the previous frame's pose."""
        return self.register(image_att, intrinsics, T_prev, config=replace(config))
