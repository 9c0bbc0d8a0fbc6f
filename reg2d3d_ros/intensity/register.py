"""Intensity-based 2D/3D registration on the differentiable DRR (conventions: :mod:`reg2d3d_ros.geometry`).

The moving image is the DRR of the target structure's region of interest only (its bone,
tapered at the dilated label, see :func:`reg2d3d_ros.volume.target_attenuation`), so other
anatomy in the frame does not pull the optimum. Registration maximises an image similarity
(:mod:`.metrics`) between that DRR and the X-ray frame in two stages:

1. **Gradient ascent, coarse to fine.** At each pyramid level ``s`` (a resolution factor of
   the frame, e.g. 0.25 then 0.5) the frame is downsampled by area averaging
   (:func:`reg2d3d_ros.drr.downsample`), the DRR is rendered with the level's intrinsics
   (:meth:`CArmIntrinsics.scaled`) and the pose is updated with Adam (or SGD with momentum)
   on the similarity, with gradients from autograd through the renderer. The pose of a level
   is ``T = P(xi) @ T_level`` where ``T_level`` is the pose the level starts from and
   ``P(xi) = Tr(c + v) R(w) Tr(-c)`` (``xi = (w [rad], v [mm])``, optical frame) rotates by
   ``so3_exp(w)`` about ``c``, the target's centre in the optical frame at ``T_level``, and then
   moves that centre by ``v``: rotation and translation do not interact, so they get separate
   learning rates in their own units. Each level keeps the best pose it evaluated (the
   optimiser's iterates may overshoot) and stops early when the similarity has not improved
   by ``min_improvement`` for ``patience`` iterations.
2. **CMA-ES refinement** (optional, the ``cmaes`` package) at the finest level over the same
   six parameters about the pose from stage 1, scaled by ``cmaes_sigma_rot_rad`` and
   ``cmaes_sigma_trans_mm``; each generation's population is rendered in one batched call.
   The stage stops after ``cmaes_generations`` generations, when CMA-ES says it has converged,
   or before a generation that would end past ``cmaes_time_budget_s`` (predicted from the
   previous generation's duration). The start pose competes with every candidate, so the
   refinement never returns a lower similarity than it was given.

Both stages compare the images within the target's footprint (the pixels its DRR covers at
the stage's start pose, dilated by ``mask_margin_mm``; :meth:`IntensityRegistrator.footprint_mask`)
and may be restricted to some degrees of freedom (``dof``, e.g. :data:`IN_PLANE_DOF`). The
similarity is computed in the geometry dtype (float64 by default) from the float32 DRR.

Observability
-------------
On a frame rendered from the target alone (the tests' exact synthetic case) every degree of
freedom is found. On simulated frames of the whole CT (overlapping anatomy, soft tissue,
degradations; :mod:`reg2d3d_ros.eval.cases`) the similarity of the target-only DRR changes by a
few hundredths over +-40 mm of depth or +-6 degrees of out-of-plane rotation and its maximum is
not at the truth there, so with all six degrees of freedom those drift by centimetres; the
in-plane ones (:data:`IN_PLANE_DOF`) are well determined with ``gc``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch

from ..drr import DRRRenderer, downsample
from ..errors import ConfigError, ImageError
from ..geometry.camera import CArmIntrinsics
from ..geometry.se3 import make_transform, so3_exp
from ..volume.target import BONE_FLOOR_HU, structure_region, target_attenuation
from .metrics import get_metric, multiscale_ncc

#: Name of the learned metric in :class:`IntensityConfig` (the model: :class:`reg2d3d_ros.similarity.LearnedSimilarity`).
LEARNED = "learned"

OPTIMIZERS = ("adam", "sgd")

#: Degrees of freedom ``(wx, wy, wz, vx, vy, vz)`` of the pose update (optical frame, about the
#: target's centre; see :attr:`IntensityConfig.dof`): all six.
ALL_DOF = (True, True, True, True, True, True)
#: Depth (optical z translation of the target's centre) frozen.
NO_DEPTH_DOF = (True, True, True, True, True, False)
#: In-plane motion only: rotation about the optical z axis through the target's centre and
#: translation parallel to the detector -- the degrees of freedom a single view observes best.
IN_PLANE_DOF = (False, False, True, True, True, False)


def _per_level(value, n: int, name: str, factor: float | None = None) -> tuple:
    """A per-level tuple from a scalar (repeated, or as float times ``factor`` per level) or a sequence of length ``n``."""
    if isinstance(value, (int, float)):
        return (value,) * n if factor is None else tuple(float(value) * factor**i for i in range(n))
    value = tuple(value)
    if len(value) != n:
        raise ConfigError(f"{name} must have one entry per level ({n}), got {len(value)}")
    return value


@dataclass(frozen=True)
class IntensityConfig:
    """Parameters of intensity-based registration.

    Attributes
    ----------
    metric : str
        Similarity: ``"ncc"``, ``"gc"`` or ``"mncc"`` (see :mod:`.metrics`), or ``"learned"``
        (the registrator's :attr:`IntensityRegistrator.learned` model, :mod:`reg2d3d_ros.similarity`; it sees
        the whole frame, so ``mask_margin_mm`` does not apply to it).
    mncc_grid : tuple of int
        Patches per side of each scale of ``mncc``.
    mask_margin_mm : float or None
        Compare the images only within the target's footprint: the pixels where the target's
        DRR at the pose a stage (level) starts from is non-zero, dilated by this margin (mm at
        the target's depth). The rest of the frame (other anatomy) is ignored. ``None``: the
        whole frame.
    dof : tuple of 6 bool
        Which of ``(wx, wy, wz, vx, vy, vz)`` (optical frame, about the target's centre) the
        optimisers may change (:data:`ALL_DOF`, :data:`NO_DEPTH_DOF`, :data:`IN_PLANE_DOF`). On
        frames with the whole anatomy the similarities hardly change with depth and the
        out-of-plane rotations (see the module doc), so freezing them keeps them at the start
        pose's values instead of letting them drift.
    levels : tuple of float
        Pyramid levels, coarse to fine: resolution factors of the frame (1.0 = full size).
    iterations : int or tuple of int
        Maximum gradient iterations per level (an int applies to every level).
    optimizer : str
        ``"adam"`` or ``"sgd"`` (with ``momentum``).
    lr_rot_rad : float or tuple of float
        Learning rate of the rotation parameters. With Adam this is about the largest rotation
        per iteration, rad; with SGD it multiplies the gradient. A tuple gives one per level; a
        float is the first level's, multiplied by ``lr_level_factor`` at each finer level.
    lr_trans_mm : float or tuple of float
        Learning rate of the translation of the target's centre (Adam: about mm per
        iteration); per level as ``lr_rot_rad``.
    lr_level_factor : float
        Factor between the learning rates of consecutive levels when they are given as floats.
    momentum : float
        SGD momentum.
    patience : int
        A level stops after this many iterations without an improvement of the best similarity
        by more than ``min_improvement``.
    min_improvement : float
        See ``patience``.
    cmaes : bool
        Run the CMA-ES refinement after the gradient stage.
    cmaes_population : int
        CMA-ES population (poses rendered per generation, in one batch).
    cmaes_sigma_rot_rad, cmaes_sigma_trans_mm : float
        Initial CMA-ES step sizes of the rotation (rad) and translation (mm) parameters.
    cmaes_generations : int
        Maximum generations.
    cmaes_time_budget_s : float
        Wall-time budget of the CMA-ES stage, seconds (its start-pose evaluation included).
    cmaes_level : float or None
        Resolution factor of the CMA-ES stage; ``None``: the finest of ``levels``.
    seed : int
        Seed of CMA-ES.
    """

    metric: str = "gc"
    mncc_grid: tuple = (1, 2, 4)
    mask_margin_mm: float | None = 10.0
    dof: tuple = ALL_DOF
    levels: tuple = (0.25, 0.5)
    iterations: int | tuple = 40
    optimizer: str = "adam"
    lr_rot_rad: float | tuple = 0.01
    lr_trans_mm: float | tuple = 1.0
    lr_level_factor: float = 0.4
    momentum: float = 0.9
    patience: int = 10
    min_improvement: float = 1e-5
    cmaes: bool = False
    cmaes_population: int = 12
    cmaes_sigma_rot_rad: float = math.radians(0.3)
    cmaes_sigma_trans_mm: float = 0.5
    cmaes_generations: int = 30
    cmaes_time_budget_s: float = 5.0
    cmaes_level: float | None = None
    seed: int = 0

    def __post_init__(self):
        if self.metric != LEARNED:
            get_metric(self.metric)  # ConfigError for an unknown name
        n = len(self.levels)
        if n == 0 or any(not (s > 0) for s in self.levels):
            raise ConfigError(f"levels must be a non-empty tuple of positive resolution factors, got {self.levels}")
        if not (self.lr_level_factor > 0):
            raise ConfigError(f"lr_level_factor must be positive, got {self.lr_level_factor}")
        object.__setattr__(self, "iterations", _per_level(self.iterations, n, "iterations"))
        for name in ("lr_rot_rad", "lr_trans_mm"):
            object.__setattr__(self, name, _per_level(getattr(self, name), n, name, self.lr_level_factor))
        if any(int(k) < 0 for k in self.iterations):
            raise ConfigError(f"iterations must be >= 0, got {self.iterations}")
        if any(not (lr >= 0) for lr in self.lr_rot_rad + self.lr_trans_mm):
            raise ConfigError("learning rates must be >= 0")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.patience < 1:
            raise ConfigError(f"patience must be >= 1, got {self.patience}")
        if self.cmaes_population < 2:
            raise ConfigError(f"cmaes_population must be >= 2, got {self.cmaes_population}")
        if not (self.cmaes_sigma_rot_rad > 0 and self.cmaes_sigma_trans_mm > 0):
            raise ConfigError("CMA-ES step sizes must be positive")
        if self.cmaes_generations < 0 or not (self.cmaes_time_budget_s >= 0):
            raise ConfigError("cmaes_generations and cmaes_time_budget_s must be >= 0")
        if len(self.dof) != 6 or not any(self.dof):
            raise ConfigError(f"dof must be 6 booleans with at least one True, got {self.dof}")
        object.__setattr__(self, "dof", tuple(bool(d) for d in self.dof))
        if self.cmaes and sum(self.dof) < 2:
            raise ConfigError("the CMA-ES refinement needs at least two free degrees of freedom")
        if self.mask_margin_mm is not None and not (self.mask_margin_mm >= 0):
            raise ConfigError(f"mask_margin_mm must be >= 0 or None, got {self.mask_margin_mm}")
        if self.cmaes_level is not None and not (self.cmaes_level > 0):
            raise ConfigError(f"cmaes_level must be a positive resolution factor, got {self.cmaes_level}")


@dataclass
class IntensityResult:
    """Outcome of :meth:`IntensityRegistrator.register`.

    Attributes
    ----------
    T_optical_from_ct : torch.Tensor
        ``(4, 4)`` float64 estimate, mm (device of ``T_init``).
    similarity : float
        Similarity of the estimate at the finest level used (CMA-ES level if it ran).
    start_similarity : float
        Similarity of ``T_init`` at the first (coarsest) level.
    iterations : int
        Gradient iterations (all levels).
    generations : int
        CMA-ES generations (0 if disabled).
    evaluations : int
        Poses rendered in all.
    seconds : float
        Wall time of the whole registration.
    level_seconds : list of tuple
        ``(stage, level, seconds)`` per gradient level and for CMA-ES (``stage`` is
        ``"gradient"`` or ``"cmaes"``).
    history : list of dict
        One entry per gradient iteration (``stage, level, iteration, similarity`` of the
        evaluated pose) and per CMA-ES generation (``stage, level, generation, similarity`` =
        best of the generation, ``best`` = best so far).
    """

    T_optical_from_ct: torch.Tensor
    similarity: float
    start_similarity: float
    iterations: int
    generations: int
    evaluations: int
    seconds: float
    level_seconds: list = field(default_factory=list)
    history: list = field(default_factory=list)


def _mask_margin(cfg: IntensityConfig) -> float | None:
    """Footprint margin of a configuration; None (no mask, no render for it) for the learned metric, which sees the whole frame."""
    return None if cfg.metric == LEARNED else cfg.mask_margin_mm


def perturb_about(xi: torch.Tensor, center_opt_mm: torch.Tensor) -> torch.Tensor:
    """Motions ``P(xi) = Tr(c + v) R(w) Tr(-c)`` in the optical frame.

    Parameters
    ----------
    xi : torch.Tensor
        ``(..., 6)`` ``(wx, wy, wz [rad], vx, vy, vz [mm])``: rotation vector about ``c`` and
        displacement of ``c``. Differentiable.
    center_opt_mm : torch.Tensor
        ``(3,)`` or ``(..., 3)`` rotation centre ``c``, optical frame, mm.

    Returns
    -------
    torch.Tensor
        ``(..., 4, 4)`` transforms (dtype of ``xi``); ``P(xi) @ T`` is the perturbed pose.
    """
    R = so3_exp(xi[..., :3])
    c = center_opt_mm.to(xi.dtype)
    t = c + xi[..., 3:] - (R @ c[..., None])[..., 0]
    return make_transform(R, t)


class IntensityRegistrator:
    """Intensity-based registration of X-ray frames to one structure of a CT.

    Parameters
    ----------
    roi : CTVolume
        The CT cropped around the target structure (its physical frame is the CT's).
    region : np.ndarray, optional
        ``(D, H, W)`` bool region of the target in ``roi`` (e.g. the dilated label); without
        one every bone of ``roi`` is rendered.
    config : IntensityConfig
        Default parameters of :meth:`register`.
    floor_hu : float, optional
        Bone floor of the moving image (default :data:`reg2d3d_ros.volume.BONE_FLOOR_HU`).
    drr_step_mm : float, optional
        Ray-casting step; default twice the smallest voxel spacing.
    dtype : torch.dtype
        Geometry and similarity dtype (float64 recommended); the renderer uses float32.
    device : torch.device or str, optional
        Device of the renderer's volume (default: CPU).
    learned : LearnedSimilarity, optional
        Model of ``metric="learned"`` (moved to ``device``); it can also be set later as
        :attr:`learned`.
    """

    def __init__(self, roi, region: np.ndarray | None = None, config: IntensityConfig = IntensityConfig(),
                 floor_hu: float | None = None, drr_step_mm: float | None = None, dtype=torch.float64, device=None, learned=None):
        self.config = config
        self.dtype = dtype
        mu = target_attenuation(roi, region, floor_hu=BONE_FLOOR_HU if floor_hu is None else floor_hu)
        nz = np.argwhere(mu > 1e-6)
        if len(nz) == 0:
            raise ConfigError("the target has no bone above the floor: nothing to register")
        lo, hi = nz.min(axis=0), nz.max(axis=0) + 1
        tight = roi.crop_ijk(lo[::-1], hi[::-1])
        mu = np.ascontiguousarray(mu[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]])
        step = 2.0 * float(roi.spacing_mm.min()) if drr_step_mm is None else float(drr_step_mm)
        self.renderer = DRRRenderer(torch.from_numpy(mu).to(device), tight.T_ct_from_ijk, step_mm=step)
        self.device = self.renderer.device
        #: The learned similarity of ``metric="learned"`` (:class:`reg2d3d_ros.similarity.LearnedSimilarity`) or None.
        self.learned = None if learned is None else learned.to(self.device)
        # attenuation-weighted centroid of the target: the rotation centre of the pose updates
        kji = np.argwhere(mu > 1e-6)
        wts = mu[kji[:, 0], kji[:, 1], kji[:, 2]].astype(np.float64)
        ijk = (kji[:, ::-1].astype(np.float64) * wts[:, None]).sum(axis=0) / wts.sum()
        #: ``(3,)`` float64 centre of the target, CT frame, mm.
        self.center_ct_mm = torch.as_tensor(tight.ijk_to_ct(ijk[None])[0], dtype=torch.float64)

    @classmethod
    def from_ct(cls, ct, label, margin_mm: float = 15.0, dilation_mm: float = 3.0,
                config: IntensityConfig = IntensityConfig(), **kwargs) -> "IntensityRegistrator":
        """Registrator for one labelled structure (e.g. ``"T8"``) of a CT with a label map.

        The CT is cropped to the label's box plus ``margin_mm``, and the moving image keeps the
        bone within the label dilated by ``dilation_mm``. ``kwargs`` go to the constructor
        (``floor_hu``, ``drr_step_mm``, ``dtype``, ``device``).
        """
        from ..volume import resolve_label

        lid = resolve_label(label, ct.label_names)
        roi = ct.crop_to_labels([lid], margin_mm=margin_mm)
        region = structure_region(roi, [lid], dilation_mm=dilation_mm)
        return cls(roi, region=region, config=config, **kwargs)

    # -------------------------------------------------------------------------------------
    def render(self, T_optical_from_ct: torch.Tensor, intrinsics: CArmIntrinsics) -> torch.Tensor:
        """DRRs ``(B, h, w)`` (float32 line integrals) of the target at poses ``(B, 4, 4)`` or ``(4, 4)``.

        Differentiable with respect to the poses.
        """
        T = T_optical_from_ct if T_optical_from_ct.ndim == 3 else T_optical_from_ct[None]
        T = T.to(device=self.device)
        K = intrinsics.K(T.dtype if T.is_floating_point() else self.dtype, device=self.device)
        return self.renderer.render(T, K, intrinsics.height, intrinsics.width).line_integral

    def metric(self, config: IntensityConfig | None = None):
        """The similarity callable of a configuration: ``(moving (B, h, w), fixed (h, w)) -> (B,)``."""
        cfg = config or self.config
        if cfg.metric == LEARNED:
            if self.learned is None:
                raise ConfigError("metric 'learned' needs a learned similarity model (none is loaded; "
                                  "train one with python -m reg2d3d_ros.similarity.train)")
            return self.learned
        fn = get_metric(cfg.metric)
        return partial(multiscale_ncc, grid=tuple(cfg.mncc_grid)) if fn is multiscale_ncc else fn

    def similarity(self, image_att, intrinsics: CArmIntrinsics, T_optical_from_ct: torch.Tensor, level: float = 1.0,
                   config: IntensityConfig | None = None) -> torch.Tensor:
        """Similarity ``(B,)`` (geometry dtype) of the frame and the DRRs at poses ``(B, 4, 4)`` or ``(4, 4)``.

        ``level`` is the resolution factor at which both are compared (no gradients). With
        ``config.mask_margin_mm`` each pose is compared within its own footprint.
        """
        cfg = config or self.config
        img = self._frame(image_att, intrinsics)
        intr, fixed = self._level(img, intrinsics, level)
        T = torch.as_tensor(T_optical_from_ct).to(dtype=self.dtype, device=self.device)
        T = T if T.ndim == 3 else T[None]
        with torch.no_grad():
            drr = self.render(T, intr).to(self.dtype)
            mask = self.footprint_mask(T, intr, _mask_margin(cfg), drr=drr)
            return self.metric(cfg)(drr, fixed, mask=mask)

    def footprint_mask(self, T_optical_from_ct: torch.Tensor, intrinsics: CArmIntrinsics, margin_mm: float | None,
                       drr: torch.Tensor | None = None) -> torch.Tensor | None:
        """Footprint masks ``(B, h, w)`` (geometry dtype, 0/1) of the target at poses ``(B, 4, 4)``.

        The pixels where the target's DRR is non-zero (above ``1e-3`` of its maximum), dilated
        by ``margin_mm`` at the depth of the target's centre (a square of that half-width).
        ``None`` for ``margin_mm=None``; a pose whose footprint is empty gets a mask of ones.
        ``drr`` (the DRRs at those poses, ``(B, h, w)``) saves a render.
        """
        if margin_mm is None:
            return None
        T = T_optical_from_ct if T_optical_from_ct.ndim == 3 else T_optical_from_ct[None]
        with torch.no_grad():
            if drr is None:
                drr = self.render(T, intrinsics)
            peak = drr.flatten(1).amax(dim=1)
            fp = (drr > 1e-3 * peak[:, None, None]) & (peak[:, None, None] > 0)
            c = self.center_ct_mm.to(dtype=T.dtype, device=T.device)
            z = (T[:, 2, :3] @ c + T[:, 2, 3]).abs().clamp(min=1e-6)
            out = []
            for k in range(T.shape[0]):
                r = int(math.ceil(float(margin_mm) * intrinsics.fx / float(z[k])))
                m = fp[k].to(self.dtype)
                if r > 0:
                    m = torch.nn.functional.max_pool2d(m[None, None], 2 * r + 1, stride=1, padding=r)[0, 0]
                out.append(m if bool(m.any()) else torch.ones_like(m))
            return torch.stack(out)

    def _frame(self, image_att, intrinsics: CArmIntrinsics) -> torch.Tensor:
        """The frame as a ``(H, W)`` float32 tensor on the renderer's device, checked."""
        img = torch.as_tensor(image_att if torch.is_tensor(image_att) else np.asarray(image_att, dtype=np.float32))
        img = img.to(dtype=torch.float32, device=self.device)
        if img.ndim != 2:
            raise ImageError(f"the frame must be a 2-D (H, W) image, got shape {tuple(img.shape)}")
        if tuple(img.shape) != (intrinsics.height, intrinsics.width):
            raise ConfigError(f"frame is {img.shape[1]}x{img.shape[0]} but the intrinsics are {intrinsics.width}x{intrinsics.height}")
        if not bool(torch.isfinite(img).all()):
            raise ImageError("the frame has NaN or infinite pixels")
        return img

    # -------------------------------------------------------------------------------------
    def register(self, image_att, intrinsics: CArmIntrinsics, T_init, config: IntensityConfig | None = None) -> IntensityResult:
        """Register one frame starting from ``T_init``.

        Parameters
        ----------
        image_att : np.ndarray or torch.Tensor
            ``(H, W)`` attenuation-like frame (bright = bone), see :func:`reg2d3d_ros.images.to_attenuation`.
        intrinsics : CArmIntrinsics
            Camera of the frame (its size must match the frame).
        T_init : torch.Tensor
            ``(4, 4)`` start pose ``T_optical_from_ct``, mm.
        config : IntensityConfig, optional
            Overrides the registrator's default configuration.

        Returns
        -------
        IntensityResult
        """
        cfg = config or self.config
        t_start = time.perf_counter()
        img = self._frame(image_att, intrinsics)
        T0 = torch.as_tensor(T_init)
        if T0.shape != (4, 4):
            raise ConfigError(f"T_init must be (4, 4), got shape {tuple(T0.shape)}")
        out_device = T0.device
        T = T0.to(dtype=self.dtype, device=self.device).clone()
        metric = self.metric(cfg)
        history, level_seconds = [], []
        iterations = evaluations = generations = 0
        start_sim = sim = float("nan")
        for li, s in enumerate(cfg.levels):
            t_level = time.perf_counter()
            intr, fixed = self._level(img, intrinsics, s)
            T, info = self._ascend(T, fixed, intr, metric, cfg, li)
            for h in info["history"]:
                h.update(stage="gradient", level=s)
            history += info["history"]
            iterations += info["iterations"]
            evaluations += info["evaluations"]
            if li == 0:
                start_sim = info["start_similarity"]
            sim = info["similarity"]
            level_seconds.append(("gradient", s, time.perf_counter() - t_level))
        if cfg.cmaes and cfg.cmaes_generations > 0:
            t_level = time.perf_counter()
            s = cfg.levels[-1] if cfg.cmaes_level is None else cfg.cmaes_level
            if s != cfg.levels[-1]:
                intr, fixed = self._level(img, intrinsics, s)
            T, info = self._cmaes(T, fixed, intr, metric, cfg, t_level)
            for h in info["history"]:
                h.update(stage="cmaes", level=s)
            history += info["history"]
            generations = info["generations"]
            evaluations += info["evaluations"]
            sim = info["similarity"]
            level_seconds.append(("cmaes", s, time.perf_counter() - t_level))
        return IntensityResult(
            T_optical_from_ct=T.detach().to(dtype=torch.float64, device=out_device),
            similarity=float(sim),
            start_similarity=float(start_sim),
            iterations=iterations,
            generations=generations,
            evaluations=evaluations,
            seconds=time.perf_counter() - t_start,
            level_seconds=level_seconds,
            history=history,
        )

    def _level(self, img: torch.Tensor, intrinsics: CArmIntrinsics, s: float):
        """Intrinsics and fixed image ``(h, w)`` (geometry dtype) of resolution factor ``s``."""
        if s == 1.0:
            return intrinsics, img.to(self.dtype)
        intr = intrinsics.scaled(s)
        fixed = downsample(img[None], s)[0].to(self.dtype)
        if tuple(fixed.shape) != (intr.height, intr.width):  # both round W * s; guard anyway
            raise ConfigError(f"level {s}: image {tuple(fixed.shape)} vs intrinsics {intr.height}x{intr.width}")
        return intr, fixed

    def _evaluate(self, xi: torch.Tensor, T_base: torch.Tensor, center_opt: torch.Tensor, fixed, intr, metric) -> torch.Tensor:
        """Similarities ``(B,)`` of the poses ``P(xi) @ T_base`` for ``xi`` ``(B, 6)``."""
        T = perturb_about(xi, center_opt) @ T_base
        drr = self.render(T, intr)
        return metric(drr.to(self.dtype), fixed)

    def _center_opt(self, T: torch.Tensor) -> torch.Tensor:
        c = self.center_ct_mm.to(dtype=T.dtype, device=T.device)
        return T[:3, :3] @ c + T[:3, 3]

    def _ascend(self, T_base: torch.Tensor, fixed, intr, metric, cfg: IntensityConfig, li: int):
        """Gradient ascent at one level; returns the best pose and a summary."""
        center = self._center_opt(T_base).detach()
        mask = self.footprint_mask(T_base, intr, _mask_margin(cfg))
        metric = metric if mask is None else partial(metric, mask=mask)
        w = torch.zeros(3, dtype=self.dtype, device=self.device, requires_grad=True)
        v = torch.zeros(3, dtype=self.dtype, device=self.device, requires_grad=True)
        groups = [{"params": [w], "lr": float(cfg.lr_rot_rad[li])}, {"params": [v], "lr": float(cfg.lr_trans_mm[li])}]
        if cfg.optimizer == "adam":
            opt = torch.optim.Adam(groups)
        else:
            opt = torch.optim.SGD(groups, momentum=cfg.momentum)
        free = torch.tensor(cfg.dof, dtype=self.dtype, device=self.device)
        n_iter = int(cfg.iterations[li])
        best_sim, best_xi, since = -math.inf, torch.zeros(6, dtype=self.dtype, device=self.device), 0
        history, first, evaluations, done = [], None, 0, 0
        for it in range(n_iter + 1):  # the last pass only evaluates the final iterate
            step = it < n_iter
            with torch.set_grad_enabled(step):
                xi = torch.cat([w, v]) * free
                sim = self._evaluate(xi[None], T_base, center, fixed, intr, metric)[0]
            evaluations += 1
            val = float(sim.detach())
            if first is None:
                first = val
            history.append({"iteration": it, "similarity": val})
            if val > best_sim + cfg.min_improvement:
                since = 0
            else:
                since += 1
            if val > best_sim:
                best_sim, best_xi = val, xi.detach().clone()
            if not step or since >= cfg.patience or not math.isfinite(val):
                break
            opt.zero_grad(set_to_none=True)
            (-sim).backward()
            opt.step()
            done += 1
        T = perturb_about(best_xi, center) @ T_base
        return T.detach(), {"history": history, "iterations": done, "evaluations": evaluations,
                            "start_similarity": first, "similarity": best_sim}

    def _cmaes(self, T_base: torch.Tensor, fixed, intr, metric, cfg: IntensityConfig, t0: float):
        """CMA-ES refinement about ``T_base`` within the time budget; returns the best pose and a summary."""
        from cmaes import CMA

        center = self._center_opt(T_base).detach()
        mask = self.footprint_mask(T_base, intr, _mask_margin(cfg))
        metric = metric if mask is None else partial(metric, mask=mask)
        free = [k for k in range(6) if cfg.dof[k]]
        scale = torch.tensor([cfg.cmaes_sigma_rot_rad] * 3 + [cfg.cmaes_sigma_trans_mm] * 3, dtype=self.dtype, device=self.device)[free]
        zero = torch.zeros(1, 6, dtype=self.dtype, device=self.device)
        t_eval = time.perf_counter()
        with torch.no_grad():
            start_sim = float(self._evaluate(zero, T_base, center, fixed, intr, metric)[0])
        # a generation renders a population in one call: predict its duration from one pose until measured
        predicted = (time.perf_counter() - t_eval) * cfg.cmaes_population
        best_sim, best_xi = start_sim, zero[0]
        opt = CMA(mean=np.zeros(len(free)), sigma=1.0, population_size=int(cfg.cmaes_population), seed=int(cfg.seed))
        history, generations, evaluations = [], 0, 1
        while generations < cfg.cmaes_generations:
            if time.perf_counter() - t0 + predicted > cfg.cmaes_time_budget_s:
                break
            t_gen = time.perf_counter()
            xs = np.stack([opt.ask() for _ in range(opt.population_size)])
            xi = torch.zeros(len(xs), 6, dtype=self.dtype, device=self.device)
            xi[:, free] = torch.as_tensor(xs, dtype=self.dtype, device=self.device) * scale
            with torch.no_grad():
                sims = self._evaluate(xi, T_base, center, fixed, intr, metric)
            vals = sims.detach().cpu().numpy().astype(np.float64)
            vals = np.where(np.isfinite(vals), vals, -2.0)  # a failed render is the worst candidate
            opt.tell([(xs[k], -float(vals[k])) for k in range(len(xs))])
            evaluations += len(xs)
            generations += 1
            k = int(np.argmax(vals))
            if vals[k] > best_sim:
                best_sim, best_xi = float(vals[k]), xi[k].clone()
            history.append({"generation": generations - 1, "similarity": float(vals[k]), "best": best_sim})
            predicted = time.perf_counter() - t_gen
            if opt.should_stop():
                break
        T = perturb_about(best_xi, center) @ T_base
        return T.detach(), {"history": history, "generations": generations, "evaluations": evaluations,
                            "start_similarity": start_sim, "similarity": best_sim}
