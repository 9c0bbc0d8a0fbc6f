"""The registration pipeline behind the ROS node, without ROS (conventions: :mod:`reg2d3d_ros.geometry`).

States (the ``state`` field the node reports on ``/diagnostics``):

``waiting_for_ct``
    the CT and the target are not loaded (loading, or loading failed: see ``last_error``);
``initialising``
    the next usable frame is registered from an initial pose: a pose given with
    :meth:`RegistrationPipeline.set_initial_pose`, else the SCR-PnP initialiser's pose when the
    models folder holds an SCR model (``scr.pt``), else the last good pose. The SCR pose is
    refined by PPC registration, its depth (SCR's largest error) searched with the whole field of
    view (``depth_search_mm``) and registered again there; a pose the SCR acceptance test rejects
    publishes nothing and the next frame tries again;
``tracking``
    every usable frame is tracked from the previous frame's pose;
``lost``
    the last frame's registration was judged unreliable (confidence below the thresholds): no
    pose was published for it and the next frame is initialised afresh (by SCR when available,
    else from the last good pose).

A frame that cannot be used (wrong encoding, size that disagrees with the camera info, NaN or
constant pixels, no camera info yet) produces no pose and a :class:`FrameResult` whose ``error``
says why; the state does not change. Every method is called from one worker thread by the node;
:meth:`set_initial_pose`, :meth:`set_camera_info` and :meth:`reset` may be called from other
threads (they only store values under a lock).
"""

from __future__ import annotations

import math

import threading
import time
from dataclasses import asdict, dataclass, field, make_dataclass, replace

import numpy as np
import torch

from .errors import ConfigError, ImageError, ModelLoadError, Reg2D3DError
from .geometry.camera import CArmIntrinsics
from .images import decode_image, to_attenuation
from .settings import INTENSITY_STAGES, TRACK_DOFS, TRACKERS, pipeline_settings, validate  # noqa: F401 (re-exported)

#: Gradient iterations of the learned similarity's recover stage.
LEARNED_RECOVER_ITERATIONS = 60

#: The polish of every PPC registration (``PipelineConfig.polish``): resolution factors (for
#: frames with the reference pixel size, 0.6 mm at 512 px) and gradient iterations per level,
#: chosen on the tuning cases (15 + 10 iterations: about 2.5 s at 512 px on 2 cores; 40 at the
#: finer level alone was as precise and three times slower).
POLISH_LEVELS = (0.25, 0.5)
POLISH_ITERATIONS = (15, 10)

#: The guard of every PPC registration (``PipelineConfig.guard``, see ``PPCConfig.guard``): the
#: updates are judged by the gradient correlation, the in-plane search's starts are compared by
#: it, and a polish is kept whenever it raises the gradient correlation (however far it moves).
#: Chosen on the tuning cases (T7, T9, T11, 512 px, 0-30 mm starts: SR 61 -> 72 %; 0-10 mm:
#: 64 -> 83 % with the polish). A candidate of the search replaces the start only when its
#: correlation is 10 % higher: with no margin, a true start of T11 (benchmark tuning frames)
#: lost to the neighbouring vertebra 28 mm away by 3 % (0.393 vs 0.381) and was tracked there.
GUARD_SETTINGS = {"guard": True, "search_select": "gc", "search_margin_gc": 0.1, "polish_max_mm": 100.0}

#: Updates without depth after the in-plane one, per tracked frame (``track_dof`` ``no_depth``).
TRACK_NO_DEPTH_ITERATIONS = 2

#: Smallest in-plane correction the peak check applies to a tracked pose (``peak_correction``), mm.
PEAK_CORRECTION_MIN_MM = 0.5

#: Resolution factor of the peak check and the tracking guard (for frames with the reference
#: pixel size; a 256x256 frame at 1.2 mm is compared at full resolution).
PEAK_LEVEL = 0.5

#: Range of the peak check (``PipelineConfig.max_peak_offset_mm``): image-plane shifts up to
#: this many mm at the target's depth are compared with the pose.
PEAK_RANGE_MM = 12.0

#: Standard deviation of the anchor prior on depth of every registration, mm (was 10 mm: from a
#: true start PPC drifted 12 mm in depth on the benchmark's tuning frames).
DEPTH_ANCHOR_MM = 3.0

#: Smallest depth move of the depth search (``depth_search_mm``) that registers again, mm: below
#: it the profile's peak is within its own precision of the pose.
DEPTH_SEARCH_MIN_MOVE_MM = 2.0

WAITING_FOR_CT = "waiting_for_ct"
INITIALISING = "initialising"
TRACKING = "tracking"
LOST = "lost"


def _pipeline_config_class():
    """:class:`PipelineConfig`, one field per pipeline setting of :data:`reg2d3d_ros.settings.SETTINGS`."""
    settings = pipeline_settings()
    cls = make_dataclass("PipelineConfig", [(x.name, type(x.default), field(default=x.default)) for x in settings])
    cls.__module__ = __name__
    lines = ["What the pipeline registers and how: one field per pipeline setting of",
             ":data:`reg2d3d_ros.settings.SETTINGS` (the node's parameters of the same names), with its default.",
             "", "Attributes", "----------"]
    for x in settings:
        allowed = f" One of {', '.join(x.choices)}." if x.choices else (f" In [{x.range[0]}, {x.range[1]}]." if x.range else "")
        lines += [f"{x.name} : {type(x.default).__name__}", f"    {x.description[0].upper()}{x.description[1:]}"
                  f"{f' ({x.unit})' if x.unit else ''}.{allowed} Default {x.default!r}."]
    cls.__doc__ = "\n".join(lines)
    return cls


PipelineConfig = _pipeline_config_class()


@dataclass
class FrameResult:
    """Outcome of :meth:`RegistrationPipeline.process`.

    Attributes
    ----------
    T_optical_from_ct : torch.Tensor or None
        ``(4, 4)`` float64 pose in mm to publish, or None (nothing to publish for this frame).
    state : str
        Pipeline state after the frame.
    error : str
        Why the frame produced no pose ('' when a pose was produced).
    confidence : float
        Inlier fraction of the registration (0 if none ran).
    seconds : float
        Processing time of the frame.
    image : np.ndarray or None
        ``(H, W)`` float32 attenuation-like frame (when it could be decoded), for the overlay.
    intrinsics : CArmIntrinsics or None
        The camera the frame was registered with.
    T_registered : torch.Tensor or None
        ``(4, 4)`` float64 pose (mm) the registration reached, published or not (for
        evaluations of the acceptance checks; None when no registration ran).
    reason : str
        Why nothing was published, as a code (:data:`REASONS`; '' when a pose was published):
        the node maps it to its log level and diagnostics without reading ``error``.
    mode : str
        What ran: ``track``, ``initialise (<source>)`` with source ``initial_pose``, ``scr``,
        ``last_good`` (and ``+refine`` / ``+recover``), or '' when no registration ran.
    """

    T_optical_from_ct: torch.Tensor | None
    state: str
    error: str = ""
    confidence: float = 0.0
    seconds: float = 0.0
    details: dict = field(default_factory=dict)
    image: np.ndarray | None = None
    intrinsics: CArmIntrinsics | None = None
    T_registered: torch.Tensor | None = None
    reason: str = ""
    mode: str = ""


#: Codes of :attr:`FrameResult.reason`: the CT is not loaded; the frame cannot be used (encoding,
#: size, no camera info); no initial pose and no SCR model; SCR-PnP's pose was rejected; the
#: registration failed with an error; tracking was judged lost; a (re-)initialisation was rejected.
REASONS = ("no_ct", "bad_frame", "no_initial_pose", "scr_rejected", "registration_error", "lost", "rejected")


class RegistrationPipeline:
    """Frame-by-frame registration of X-ray frames to one structure of a CT."""

    def __init__(self, config: PipelineConfig):
        validate(asdict(config))  # types, ranges and choices of every setting, all problems in one message
        self.intensity = None  # intensity registrator of the recover/refine stages (set by load when one is on)
        self.config = config
        self.backend = ""
        self.device = ""
        self.engines: list = []
        self.models: list = []
        self.state = WAITING_FOR_CT
        self.last_error = ""
        self.registrator = None
        self._lock = threading.Lock()
        self._intrinsics: CArmIntrinsics | None = None
        self._initial_pose: torch.Tensor | None = None
        self._last_good: torch.Tensor | None = None
        self._previous: torch.Tensor | None = None
        self._previous_moving: tuple | None = None  # (moving gradient, footprint) the peak check rendered for ``_previous``, and its shift (px)
        self._recent_inliers: list = []  # inlier fractions of the frames accepted since the last initialisation
        self._recent_gc: list = []  # gradient correlations (peak check) of the same frames
        self._before_previous: torch.Tensor | None = None  # the pose before ``_previous`` when both were tracked consecutively
        self.scr = None  # SCR-PnP initialiser when the models folder has one
        self.neighbour_check = None  # which-vertebra check of initialisations (ppc.context), when the target is a vertebra
        self.depth_search = None  # depth of SCR initialisations from the whole field of view (ppc.context)
        self.register_config = None  # PPC configurations of registration and tracking (set by load)
        self.track_config = None

    # -- set-up ------------------------------------------------------------------------------
    def load(self) -> None:
        """Check back-end and model files, load the CT, prepare the target. Raises Reg2D3DError."""
        from .engines import check_models_dir, resolve_backend, resolve_device
        from .ppc import PPCRegistrator
        from .provenance import check_models_provenance
        from .volume import load_ct

        cfg = self.config
        self.device = resolve_device(cfg.device)
        self.backend = resolve_backend(cfg.backend, cfg.device)
        self.models = check_models_dir(cfg.models_dir)
        if not cfg.ct_path:
            raise ConfigError("no CT given: set the parameter ct_path")
        if not cfg.labels_path:
            raise ConfigError("no label map given: set labels_path (the target structure is selected from it)")
        ct = load_ct(cfg.ct_path, labels_path=cfg.labels_path, label_table=cfg.label_table_path or None,
                     label_set=cfg.label_set, resample_labels=cfg.resample_labels)
        check_models_provenance(cfg.models_dir, ct, cfg.target)  # a folder made for another CT or target: one line, waiting_for_ct
        self.register_config, self.track_config = ppc_configs(cfg)
        learned = load_ppcl(cfg.models_dir, cfg.backend, cfg.device) if cfg.tracker.startswith("ppc_l") else None
        if learned is not None:
            missing = [lv for lv in self.register_config.learned_levels + self.track_config.learned_levels
                       if all(abs(lv - x) > 1e-6 for x in learned.levels)]
            if missing:
                raise ModelLoadError(f"tracker {cfg.tracker!r} needs PPC-L networks for the levels {sorted(set(missing))}; "
                                     f"{cfg.models_dir}/ppcl.pt has {list(learned.levels)} (train them with python -m reg2d3d_ros.ppcl.train --levels ...)")
        flow = load_ppcflow(cfg.models_dir, cfg.backend, cfg.device) if cfg.tracker == "ppc_flow_plus" else None
        from .ppc.surface import surface_sampling

        # a coarse CT (e.g. 3 mm) is sampled on a finer grid so that it gives as many surface points as a 0.7 mm one
        self.registrator = PPCRegistrator.from_ct(ct, cfg.target, learned=learned, flow=flow, moving=moving_image(cfg),
                                                  surface_kwargs=surface_sampling(ct.spacing_mm))
        self.scr = load_scr(cfg.models_dir, cfg.backend, cfg.device)
        from .ppc.context import DepthSearch, NeighbourCheck, whole_ct_renderer

        self.neighbour_check = NeighbourCheck.from_ct(ct, ct.structure_id(cfg.target))  # None: not a vertebra with a neighbour
        whole_ct = self.neighbour_check.renderer if self.neighbour_check is not None else whole_ct_renderer(ct)
        self.depth_search = DepthSearch(whole_ct, self.registrator.pts.mean(0).double().numpy())
        if cfg.recover != "off" or cfg.refine != "off":
            from .intensity import IntensityRegistrator

            sim = load_similarity(cfg.models_dir, self.device) if {"learned", "learned_gc"} & {cfg.recover, cfg.refine} else None
            self.intensity = IntensityRegistrator.from_ct(ct, cfg.target, learned=sim)
        #: every network's engine (name, back-end, device, notes), for the log and diagnostics
        self.engines = ([] if self.scr is None else [self.scr.runner]) + (list(learned.engines.values()) if learned else []) + \
            (list(flow.engines.values()) if flow else [])
        with self._lock:
            self.state = INITIALISING

    def fail_load(self, message: str) -> None:
        """Record a loading failure (the pipeline stays in ``waiting_for_ct``)."""
        with self._lock:
            self.state = WAITING_FOR_CT
            self.last_error = message

    def set_camera_info(self, k, width: int, height: int) -> None:
        """Latest camera intrinsics (``sensor_msgs/CameraInfo`` K, width, height)."""
        intr = CArmIntrinsics.from_camera_info(k, width, height)
        with self._lock:
            self._intrinsics = intr

    def set_initial_pose(self, T_optical_from_ct_mm: torch.Tensor) -> None:
        """A pose guess that replaces the initialisation on the next frame."""
        T = torch.as_tensor(T_optical_from_ct_mm, dtype=torch.float64)
        if T.shape != (4, 4) or not bool(torch.isfinite(T).all()):
            raise ConfigError("initial pose must be a finite 4x4 transform")
        with self._lock:
            self._initial_pose = T
            self._recent_inliers = []
            self._recent_gc = []
            if self.state in (TRACKING, LOST):
                self.state = INITIALISING

    def reset(self) -> None:
        """Forget the current pose (the last good one, and a refused initial pose waiting to be tried
        again): the next frame is initialised afresh.

        With an SCR model that is SCR-PnP; without one, the node waits for a pose on the
        initial-pose input.
        """
        with self._lock:
            self._initial_pose = None
            self._previous = None
            self._previous_moving = None
            self._last_good = None
            self._before_previous = None
            self._recent_inliers = []
            self._recent_gc = []
            if self.state != WAITING_FOR_CT:
                self.state = INITIALISING

    # -- per frame -------------------------------------------------------------------------
    def check_frame(self, encoding: str, height: int, width: int, step: int, data, is_bigendian: int = 0):
        """Decode and validate a frame; returns ``(attenuation image (H, W) float32, intrinsics)``.

        Raises
        ------
        ImageError
            Unusable frame (encoding, size, pixels) or no camera info yet.
        """
        with self._lock:
            intr = self._intrinsics
        if intr is None:
            raise ImageError("no camera_info received yet: cannot use the frame")
        if (width, height) != (intr.width, intr.height):
            raise ImageError(f"frame is {width}x{height} but camera_info says {intr.width}x{intr.height}")
        raw = decode_image(encoding, height, width, step, data, is_bigendian)
        return to_attenuation(raw, self.config.intensity), intr

    def process(self, encoding: str, height: int, width: int, step: int, data, is_bigendian: int = 0) -> FrameResult:
        """Register one frame (the node calls this from its worker thread)."""
        t0 = time.perf_counter()
        with self._lock:
            state = self.state
        if state == WAITING_FOR_CT or self.registrator is None:
            return FrameResult(None, state, f"CT not loaded{': ' + self.last_error if self.last_error else ''}", seconds=time.perf_counter() - t0,
                               reason="no_ct")
        try:
            image, intr = self.check_frame(encoding, height, width, step, data, is_bigendian)
        except ImageError as exc:
            return FrameResult(None, state, str(exc), seconds=time.perf_counter() - t0, reason="bad_frame")

        with self._lock:
            initial, self._initial_pose = self._initial_pose, None
            previous = self._previous
            previous_moving = self._previous_moving
            before_previous = self._before_previous
            last_good = self._last_good
        try:
            scr_details = {}
            if initial is not None or state in (INITIALISING, LOST) or previous is None:
                start, source = initial, "initial_pose"
                if start is None and self.scr is not None:
                    r = self.scr.initialise(image, intr.K(torch.float64).numpy())
                    scr_details = {"scr_inliers": r.pnp.n_inliers, "scr_inlier_fraction": round(r.confidence, 3),
                                   "scr_ms": round(1000 * (r.network_seconds + r.pnp_seconds), 1)}
                    if r.accepted:
                        start, source = r.T_optical_from_ct, "scr"
                    elif last_good is None:
                        return FrameResult(None, state, r.why, r.confidence, time.perf_counter() - t0, scr_details, image, intr,
                                           reason="scr_rejected", mode="initialise (scr)")
                    else:
                        scr_details["scr_rejected"] = r.why
                if start is not None and self.config.refine != "off":
                    start, scr_details["refine"] = self._intensity_stage(image, intr, start, self.config.refine, recover=False)
                    source += "+refine"
                if start is None and last_good is not None:
                    start, source = last_good, "last_good"
                    if self.config.recover != "off":
                        start, scr_details["recover"] = self._intensity_stage(image, intr, start, self.config.recover, recover=True)
                        source += "+recover"
                if start is None:
                    msg = "no initial pose: publish one on the initial_pose topic (no SCR model in models_dir: create one with python -m reg2d3d_ros.prepare)"
                    with self._lock:
                        self.state = INITIALISING
                    return FrameResult(None, INITIALISING, msg, seconds=time.perf_counter() - t0, image=image, intrinsics=intr,
                                       reason="no_initial_pose")
                mode = f"initialise ({source})"
                result = ambiguous = None
                if self.config.search_range_mm > 0 and self.config.local_first and self.register_config is not None:
                    # the start's own optimum first: when it passes every check it is kept, so a start
                    # near the truth never loses to a look-alike (a neighbour vertebra) the search finds
                    local = self.registrator.register(image, intr, start, config=replace(self.register_config, search_range_mm=0.0))
                    judged = self._judge(local, mode, image, intr)
                    if not judged["why"]:
                        result = local
                        scr_details["search"] = "not needed"
                    else:
                        scr_details["search"] = f"local optimum refused ({judged['why'][:80]})"
                        if judged["peak"] is not None:  # what the ambiguity check reads (kept for tuning it)
                            lp = judged["peak"]
                            scr_details["local_peak"] = {"gc": round(lp.gc, 4), "peak_gc": round(lp.peak_gc, 4),
                                                         "offset_mm": round(lp.peak_offset_mm, 2), "T": local.T_optical_from_ct.tolist()}
                        ambiguous = self._ambiguity(local, judged)
                if result is None:
                    result = self.registrator.register(image, intr, start, config=self.register_config)
                    judged = None
                if source.startswith("scr") and self.config.depth_search_mm > 0 and self.depth_search is not None:
                    result, moved = self._search_depth(result, image, intr, scr_details)
                    judged = None if moved else judged
            else:
                start = predict_pose(previous, before_previous, self.config.motion_prediction)
                result = self.registrator.track(image, intr, start, config=self.track_config)
                mode, judged, ambiguous = "track", None, None
        except Reg2D3DError as exc:
            return FrameResult(None, state, str(exc), seconds=time.perf_counter() - t0, reason="registration_error")

        cfg = self.config
        if judged is None:
            judged = self._judge(result, mode, image, intr)
        if "local_peak" in scr_details:  # how far the search moved from the refused start-near optimum
            scr_details["local_peak"]["search_moved_mm"] = round(_mean_displacement_mm(
                torch.tensor(scr_details["local_peak"]["T"], dtype=torch.float64), result.T_optical_from_ct, self.registrator.pts), 2)
        if ambiguous is not None and not judged["why"]:
            moved_mm = _mean_displacement_mm(ambiguous[0].T_optical_from_ct, result.T_optical_from_ct, self.registrator.pts)
            if moved_mm > self.config.max_peak_offset_mm:  # the search went to the other place
                judged = {**judged, "why": f"{ambiguous[1]}; the search moved {moved_mm:.1f} mm to it"}
        why, peak, score, gc, reference = judged["why"], judged["peak"], judged["score"], judged["gc"], judged["reference"]
        recent, recent_gc = judged["recent"], judged["recent_gc"]
        ok = not why
        details = {"mode": mode, "iterations": result.iterations, "correspondences": result.n_correspondences, "mean_ngc": result.mean_ngc,
                   "reference_inlier_fraction": reference, **scr_details}
        if mode != "track" and getattr(self.register_config, "search_range_mm", 0.0) > 0:
            details["search_candidate"] = result.candidate  # 0: the start itself won, k: the in-plane search's k-th candidate
        if gc is not None:
            details["gradient_correlation"] = round(gc, 4)
        if judged.get("neighbour") is not None:
            nb = judged["neighbour"]
            details["neighbour_check"] = {"gc": round(nb["gc"], 4), "ratio": round(nb["ratio"], 3),
                                          **{k: round(v, 4) for k, v in nb["neighbours"].items()}}
        T_out = result.T_optical_from_ct
        if peak is not None:
            details["peak"] = {"gc": round(peak.gc, 4), "peak_gc": round(peak.peak_gc, 4), "offset_mm": round(peak.peak_offset_mm, 2),
                               "prominence": round(peak.prominence, 3)}
            if not why and mode == "track" and cfg.peak_correction and math.hypot(*peak.shift_mm) >= PEAK_CORRECTION_MIN_MM:
                # the frame matches the target best slightly beside the tracked pose: move there (in-plane)
                from .ppc.search import translate

                T_out = translate(T_out, (peak.shift_mm[0], peak.shift_mm[1], 0.0))
                details["peak"]["corrected_mm"] = [round(x, 2) for x in peak.shift_mm]
            if not why and mode == "track" and cfg.track_guard:
                # the update must not fit the frame worse than the previous pose did (noise walks a still
                # view away); the previous pose is scored from the moving gradient the last frame's check
                # rendered for it (no second render). (Comparing with the predicted start instead held
                # moving views back less but published more drifted poses on the tuning sequences.)
                from .ppc.search import shifted_gc

                gc_prev = (shifted_gc(score.grad_fixed, previous_moving[0], previous_moving[1])
                           if previous_moving is not None and previous_moving[0][0].shape == score.grad_fixed.shape else score(previous))
                if gc_prev > (peak.peak_gc if "corrected_mm" in details["peak"] else peak.gc):
                    T_out = previous
                    details["peak"]["kept_previous"] = round(gc_prev, 4)
        if result.polish:
            details["polish"] = {"kept": result.polish["kept"], "moved_mm": round(result.polish["moved_mm"], 2),
                                 "gc_before": round(result.polish["gc_before"], 4), "gc_after": round(result.polish["gc_after"], 4),
                                 "ms": round(1000 * result.polish["seconds"], 1)}
        with self._lock:
            if ok:
                self.state = TRACKING
                self._before_previous = self._previous if mode == "track" else None
                if "kept_previous" not in details.get("peak", {}):
                    self._previous_moving = None if peak is None or peak.moving is None else \
                        (peak.moving, peak.shift_px if "corrected_mm" in details["peak"] else (0.0, 0.0))
                self._previous = T_out
                self._last_good = T_out
                self._recent_inliers = (recent + [result.inlier_fraction])[-10:]
                if peak is not None:
                    self._recent_gc = (recent_gc + [peak.gc])[-10:]
            else:
                self.state = LOST
                self._previous = None
                self._previous_moving = None
                self._before_previous = None
                if initial is not None and self._initial_pose is None:
                    self._initial_pose = initial  # a refused initial pose is tried again on the next frame (until a newer one comes)
            new_state = self.state
        return FrameResult(T_out if ok else None, new_state, why, result.inlier_fraction, time.perf_counter() - t0,
                           details, image, intr, T_registered=T_out, mode=mode,
                           reason="" if ok else ("lost" if mode == "track" else "rejected"))

    def _search_depth(self, result, image, intr: CArmIntrinsics, details: dict):
        """SCR's depth corrected by the whole view's depth profile (:class:`~reg2d3d_ros.ppc.context.DepthSearch`).

        At an accepted peak the target is registered again (locally, PPC holding depth near the
        new start); returns ``(result, moved)`` and records ``details["depth_search"]``.
        """
        from .ppc.context import along_ray

        t0 = time.perf_counter()
        found = self.depth_search(image, intr, result.T_optical_from_ct, self.config.depth_search_mm, self.config.min_depth_prominence)
        rec = {"offset_mm": round(found["offset_mm"], 2), "prominence": found["prominence"], "gc": round(found["gc"], 4),
               "peak_gc": round(found["peak_gc"], 4)}
        if found["why"]:
            rec["kept"] = found["why"]
        moved = found["accepted"] and abs(found["offset_mm"]) >= DEPTH_SEARCH_MIN_MOVE_MM
        if moved:
            T = along_ray(result.T_optical_from_ct, self.depth_search.center_ct_mm, found["offset_mm"])
            result = self.registrator.register(image, intr, T, config=replace(self.register_config, search_range_mm=0.0))
        rec["ms"] = round(1000 * (time.perf_counter() - t0), 1)
        details["depth_search"] = rec
        return result, moved

    def _judge(self, result, mode: str, image, intr: CArmIntrinsics) -> dict:
        """The checks of a registration (``mode`` ``track`` or ``initialise (...)``) on its frame.

        Returns a dict: ``why`` (empty when the pose may be published, else the reason it may
        not), ``peak`` (:class:`~reg2d3d_ros.ppc.search.PeakCheck` or None), ``score`` (the
        frame's :class:`~reg2d3d_ros.ppc.search.GradientCorrelation` or None), ``gc`` (the
        acceptance gradient correlation of an initialisation or None), ``reference`` (the
        recent inlier fraction or None) and ``recent`` / ``recent_gc`` (the inlier fractions and
        gradient correlations of the last accepted frames it was judged against).
        """
        cfg = self.config
        with self._lock:
            recent = list(self._recent_inliers)
            recent_gc = list(self._recent_gc)
        reference = float(np.median(recent[-10:])) if len(recent) >= 3 else None
        reference_gc = float(np.median(recent_gc[-10:])) if len(recent_gc) >= 3 else None
        peak = score = None
        if cfg.max_peak_offset_mm > 0 or cfg.lost_relative_gc > 0:
            from .ppc.search import GradientCorrelation, peak_check

            score = GradientCorrelation(self.registrator, image, intr, level=PEAK_LEVEL)  # the frame's gradient, once
            peak = peak_check(self.registrator, image, intr, result.T_optical_from_ct, range_mm=PEAK_RANGE_MM, level=PEAK_LEVEL,
                              grad_fixed=score.grad_fixed)
        why = ""
        if peak is None and (cfg.max_peak_offset_mm > 0 or cfg.lost_relative_gc > 0):
            why = "tracking lost: the target does not project into the frame at the registered pose"
        elif cfg.max_peak_offset_mm > 0 and peak.peak_offset_mm > cfg.max_peak_offset_mm:
            why = (f"{'tracking lost' if mode == 'track' else 'initialisation rejected'}: the frame matches the target "
                   f"{peak.peak_offset_mm:.1f} mm from the registered pose (> max_peak_offset_mm {cfg.max_peak_offset_mm})")
        elif cfg.lost_relative_gc > 0 and reference_gc is not None and peak.gc < cfg.lost_relative_gc * reference_gc:
            why = (f"tracking lost: gradient correlation {peak.gc:.3f} dropped below {cfg.lost_relative_gc} x its recent level "
                   f"{reference_gc:.3f}")
        elif result.inlier_fraction < cfg.lost_inlier_fraction:
            why = f"tracking lost: inlier fraction {result.inlier_fraction:.2f} < {cfg.lost_inlier_fraction}"
        elif result.n_correspondences < (min_corr := self._min_correspondences(result.T_optical_from_ct, intr, mode)):
            why = f"tracking lost: {result.n_correspondences} correspondences < {min_corr}"
        elif reference is not None and result.inlier_fraction < cfg.lost_relative_fraction * reference:
            why = (f"tracking lost: inlier fraction {result.inlier_fraction:.2f} dropped below {cfg.lost_relative_fraction} x its recent "
                   f"level {reference:.2f} (sudden motion or occlusion)" if mode == "track" else
                   f"re-initialisation rejected: inlier fraction {result.inlier_fraction:.2f} below {cfg.lost_relative_fraction} x the "
                   f"level {reference:.2f} before the loss (wrong optimum?); publish an initial pose or call ~/reset")
        gc = None
        if mode != "track" and not why:
            if result.inlier_fraction < cfg.accept_inlier_fraction:
                why = (f"initialisation rejected: inlier fraction {result.inlier_fraction:.2f} < accept_inlier_fraction "
                       f"{cfg.accept_inlier_fraction} (wrong optimum?); publish a better initial pose or call ~/reset")
            elif cfg.accept_gradient_correlation > 0:
                from .ppc.search import pose_gradient_correlation

                gc = result.gradient_correlation
                if gc is None:  # the PPC pose, before any polish (which maximises a similar score)
                    gc = pose_gradient_correlation(self.registrator, image, intr, result.polish.get("T_before", result.T_optical_from_ct))
                if gc < cfg.accept_gradient_correlation:
                    why = (f"initialisation rejected: gradient correlation {gc:.3f} < accept_gradient_correlation "
                           f"{cfg.accept_gradient_correlation} (wrong optimum?); publish a better initial pose or call ~/reset")
        neighbour = None
        if mode != "track" and not why and cfg.max_neighbour_gc_ratio > 0 and self.neighbour_check is not None:
            neighbour = self.neighbour_check(image, intr, result.T_optical_from_ct)
            if neighbour["ratio"] >= cfg.max_neighbour_gc_ratio:
                why = (f"initialisation rejected: the whole field of view matches {neighbour['ratio']:.2f} x as well with the target moved "
                       f"onto {neighbour['best']} (gradient correlation {neighbour['neighbours'][neighbour['best']]:.3f} vs "
                       f"{neighbour['gc']:.3f}; >= max_neighbour_gc_ratio {cfg.max_neighbour_gc_ratio}): locked onto a neighbouring "
                       f"vertebra?; publish a closer initial pose or call ~/reset")
        return {"why": why, "peak": peak, "score": score, "gc": gc, "reference": reference, "recent": recent, "recent_gc": recent_gc,
                "neighbour": neighbour}

    def _ambiguity(self, local, judged: dict):
        """``(local result, reason)`` when a refused start-near optimum is nearly as good as the peak elsewhere, else None."""
        peak, ratio = judged["peak"], self.config.ambiguity_gc_ratio
        if ratio <= 0 or peak is None or self.config.max_peak_offset_mm <= 0 or peak.peak_offset_mm <= self.config.max_peak_offset_mm:
            return None
        if not peak.peak_gc > 0 or peak.gc < ratio * peak.peak_gc:
            return None
        return local, (f"initialisation rejected as ambiguous: the frame matches the target nearly as well here (gradient correlation "
                       f"{peak.gc:.3f}) as {peak.peak_offset_mm:.1f} mm away ({peak.peak_gc:.3f}), a look-alike such as a neighbouring "
                       f"vertebra; publish a closer initial pose or call ~/reset")

    def _min_correspondences(self, T: torch.Tensor, intr: CArmIntrinsics, mode: str) -> int:
        """``min_correspondences``, lowered where the target shows fewer contour points at this pose (small or coarse targets)."""
        from .ppc.surface import min_correspondences_at

        ppc = self.track_config if mode == "track" else self.register_config
        if ppc is None or not hasattr(self.registrator, "pts"):  # a registrator set in without load() (tests): the setting as given
            return self.config.min_correspondences
        return min_correspondences_at(self.registrator.pts, self.registrator.normals, T, intr.K(torch.float64), self.config.min_correspondences,
                                      max_cos=ppc.max_cos, cell_px=ppc.cell_px)

    def _intensity_stage(self, image, intr, start, metric: str, recover: bool):
        """Intensity-based registration from ``start`` (the recover or refine stage); returns ``(pose, details)``.

        Recovery searches wider (coarse level first, larger CMA-ES steps) than refinement. Both
        are bounded: iteration counts and the CMA-ES time budget.
        """
        return intensity_stage(self.intensity, image, intr, start, metric, recover, self.config.intensity_budget_s)

    def overlay(self, result: FrameResult, latency_ms: float | None = None, neighbours: bool = True) -> np.ndarray:
        """The overlay image of a processed frame (what the node publishes on its overlay topic).

        The frame, contrast-normalised (:func:`reg2d3d_ros.viz.contrast_normalise`); at the
        published pose the target's projected outline as connected lines (green) and, fainter
        (blue), the parts of the neighbouring vertebrae in the crop around the target that PPC
        uses (15 mm beyond the target: the crop's cut is not drawn); a legend with the target,
        the state, the confidence (inlier fraction) and the latency. A frame without a pose
        (judged lost, initialisation rejected, waiting for an initial pose) gets no outline, a
        red border and the reason in the legend. The pose-independent part of the outline is
        computed on the first call (about 0.2 s) and cached; then about 2-5 ms per frame at
        256x256 on a CPU core.

        Parameters
        ----------
        result : FrameResult
            A result whose frame was decoded (``result.image`` set).
        latency_ms : float, optional
            Latency to show (the node's: reception to publication), ms; default: the result's
            processing time.
        neighbours : bool
            Outline the neighbouring vertebrae too.

        Returns
        -------
        np.ndarray
            ``(H, W, 3)`` uint8 RGB.
        """
        from .viz import OutlineOverlay, legend_lines, overlay_frame

        if result.image is None or result.intrinsics is None:
            raise ValueError("overlay needs a result with a decoded frame")
        cache = getattr(self, "_overlay_outlines", None)
        if cache is None or cache[0] is not self.registrator:  # built once per loaded target
            cache = (self.registrator, OutlineOverlay.from_ct(self.registrator.roi, self.config.target, neighbours=1))
            self._overlay_outlines = cache
        outline = cache[1]
        if not neighbours:
            outline = OutlineOverlay([outline.target])
        refused = result.T_optical_from_ct is None
        latency = 1000.0 * result.seconds if latency_ms is None else latency_ms
        note = ""
        if refused:  # the reason's first clause ("tracking lost", "initialisation rejected", "SCR: 12 PnP inliers < 20")
            head = (result.error or "").split(":")[0]
            note = "no pose: " + (head if len(head) > 6 else result.error or "not registered")
            note = note if len(note) <= 36 else note[:35] + "."
        legend = legend_lines(result.state, result.confidence if result.confidence > 0 else None, latency, outline.target.name, note)
        return overlay_frame(result.image, outline, None if refused else result.T_optical_from_ct,
                             result.intrinsics.K(torch.float64), legend, refused=refused)


def moving_image(config: PipelineConfig) -> str:
    """The moving image (``target`` or ``roi``) a pipeline configuration means (resolves ``auto``)."""
    if config.moving_image == "auto":
        return "roi" if config.tracker == "ppc" else "target"
    return config.moving_image


def ppc_configs(config: PipelineConfig):
    """``(registration config, tracking config)`` of a pipeline: its tracker's, with its in-plane search, polish and guard."""
    register, track = tracker_configs(config.tracker)
    register = replace(register, search_range_mm=float(config.search_range_mm))
    if config.polish:
        register = replace(register, polish_levels=POLISH_LEVELS, polish_iterations=POLISH_ITERATIONS)
    if config.guard:
        register = replace(register, **GUARD_SETTINGS)
    # one view barely observes depth: the registration keeps it near the start (anchor) and the
    # polish leaves it alone (see PPCConfig.polish_dof)
    register = replace(register, anchor_trans_mm=tuple(register.anchor_trans_mm[:2]) + (DEPTH_ANCHOR_MM,),
                       polish_dof=(True, True, True, True, True, False)) if register.anchor_trans_mm else \
        replace(register, polish_dof=(True, True, True, True, True, False))
    if config.track_dof == "no_depth":
        track = replace(track, max_iterations=(1 + TRACK_NO_DEPTH_ITERATIONS,), in_plane_iterations=1,
                        no_depth_iterations=TRACK_NO_DEPTH_ITERATIONS)
    return register, track


def predict_pose(previous: torch.Tensor, before_previous: torch.Tensor | None, fraction: float) -> torch.Tensor:
    """Start of the next tracking update: ``exp(fraction * log(P B^-1)) P`` (constant velocity, damped).

    Parameters
    ----------
    previous, before_previous : torch.Tensor
        ``(4, 4)`` float64 poses ``T_optical_from_ct`` (mm) of the last two tracked frames
        (``before_previous`` None: no motion known, ``previous`` is returned).
    fraction : float
        Fraction of the last frame-to-frame motion to apply (0: none).
    """
    if before_previous is None or fraction <= 0:
        return previous
    from .geometry.se3 import invert_transform, se3_exp, se3_log

    step = se3_log((previous @ invert_transform(before_previous))[None])[0]
    return se3_exp(fraction * step[None])[0] @ previous


def tracker_configs(tracker: str):
    """``(registration config, tracking config)`` of an update operator (see ``PipelineConfig.tracker``)."""
    from .ppc import PPCL_CONFIG, PPCL_HYBRID_CONFIG, PPCL_PLUS_CONFIG, TRACKING_CONFIG, PPCConfig

    if tracker == "ppc":
        return PPCConfig(), TRACKING_CONFIG
    if tracker == "ppc_l":
        return PPCL_CONFIG, replace(TRACKING_CONFIG, learned_levels=(1.0,))
    if tracker == "ppc_l_plus":
        return PPCL_PLUS_CONFIG, TRACKING_CONFIG
    if tracker == "ppc_l_hybrid":
        return PPCL_HYBRID_CONFIG, TRACKING_CONFIG
    if tracker == "ppc_flow_plus":
        return PPCConfig(flow_levels=(0.25,)), TRACKING_CONFIG
    raise ConfigError(f"tracker {tracker!r} is not available (available: {', '.join(TRACKERS)})")


def intensity_stage(reg, image, intr, start, stage: str, recover: bool, budget_s: float):
    """Run one recover/refine stage (:data:`INTENSITY_STAGES`, not ``off``) from ``start``; returns ``(pose, details)``.

    ``learned_gc`` runs the learned similarity's stage and then the gradient-correlation
    refinement stage from its result (each with the CMA-ES budget ``budget_s``). ``details``
    holds the metric, the similarity before and after (of the last metric) and the time.
    """
    t0 = time.perf_counter()
    metrics = ["learned", "gc"] if stage == "learned_gc" else [stage]
    T, first = start, None
    for i, metric in enumerate(metrics):
        level = None
        if metric == "learned":  # compare at the network's input size
            level = min(1.0, reg.learned.input_size / max(intr.width, intr.height))
        cfg = intensity_stage_config(metric, recover and i == 0, budget_s, level=level)
        r = reg.register(image, intr, T, config=cfg)
        T, first = r.T_optical_from_ct, r.start_similarity if first is None else first
    out = {"metric": stage, "similarity": round(r.similarity, 4), "start_similarity": round(r.start_similarity, 4),
           "ms": round(1000 * (time.perf_counter() - t0), 1)}
    if len(metrics) > 1:
        out["learned_start_similarity"] = round(first, 4)
    return T, out


def intensity_stage_config(metric: str, recover: bool, budget_s: float, level: float | None = None):
    """The :class:`reg2d3d_ros.intensity.IntensityConfig` of the node's recover (wider) or refine stage.

    In-plane motion only (rotation about the principal ray, image-plane translation): on whole-CT
    frames the vertebra's DRR similarity barely constrains depth and out-of-plane rotation and
    drifts there (``reports/intensity``). The learned similarity works at one resolution,
    ``level`` (the frame scaled to the network's input size; default 0.5).
    """
    from .intensity import IN_PLANE_DOF, IntensityConfig

    if metric == "learned":
        lv = 0.5 if level is None else float(level)
        if recover:
            return IntensityConfig(metric=metric, dof=IN_PLANE_DOF, levels=(lv,), iterations=(LEARNED_RECOVER_ITERATIONS,),
                                   lr_rot_rad=0.02, lr_trans_mm=2.0, patience=15, cmaes=True, cmaes_sigma_rot_rad=math.radians(2.0),
                                   cmaes_sigma_trans_mm=3.0, cmaes_time_budget_s=budget_s)
        return IntensityConfig(metric=metric, dof=IN_PLANE_DOF, levels=(lv,), iterations=(20,), cmaes=True, cmaes_time_budget_s=budget_s)
    if recover:
        return IntensityConfig(metric=metric, dof=IN_PLANE_DOF, levels=(0.25, 0.5), iterations=(40, 20), cmaes=True,
                               cmaes_sigma_rot_rad=math.radians(2.0), cmaes_sigma_trans_mm=3.0, cmaes_time_budget_s=budget_s)
    return IntensityConfig(metric=metric, dof=IN_PLANE_DOF, levels=(0.5,), iterations=(20,), cmaes=True, cmaes_time_budget_s=budget_s)


def load_similarity(models_dir: str, device="cpu"):
    """The learned similarity of a models folder (``similarity.pt``), on ``device``.

    It always runs in PyTorch: the recover/refine stages need its gradient with respect to the
    image, which ONNX Runtime and TensorRT do not give.

    Raises
    ------
    ModelLoadError
        No models folder or no such file (the ``learned`` stages need it), or it cannot be used.
    """
    from pathlib import Path

    from .errors import ModelLoadError
    from .similarity import LearnedSimilarity

    if not models_dir:
        raise ModelLoadError("the 'learned' recover/refine stage needs models_dir with similarity.pt "
                             "(train it with python -m reg2d3d_ros.similarity.train)")
    return LearnedSimilarity.load(Path(models_dir) / "similarity.pt", device=device)


def load_ppcl(models_dir: str, backend: str = "auto", device: str = "auto"):
    """The PPC-L weighting of a models folder (``ppcl.pt``).

    Raises
    ------
    ModelLoadError
        No such file (the learned trackers need it) or it cannot be used.
    """
    from pathlib import Path

    from .errors import ModelLoadError
    from .ppcl import LearnedWeighting

    if not models_dir:
        raise ModelLoadError("the PPC-L trackers (ppc_l, ppc_l_plus, ppc_l_hybrid) need ppcl.pt in models_dir, and models_dir is not set")
    path = Path(models_dir) / "ppcl.pt"
    learned = LearnedWeighting.load(path)
    learned.attach_engines(path, backend, device)
    return learned


def load_ppcflow(models_dir: str, backend: str = "auto", device: str = "auto"):
    """The PPC Flow (Attention) operator of a models folder (``ppcflow.pt``).

    Raises
    ------
    ModelLoadError
        No such file (the ``ppc_flow_plus`` tracker needs it) or it cannot be used.
    """
    from pathlib import Path

    from .errors import ModelLoadError
    from .ppcflow import FlowOperator

    if not models_dir:
        raise ModelLoadError("the ppc_flow_plus tracker needs ppcflow.pt in models_dir, and models_dir is not set")
    path = Path(models_dir) / "ppcflow.pt"
    flow = FlowOperator.load(path)
    flow.attach_engines(path, backend, device)
    return flow


def _mean_displacement_mm(T_a: torch.Tensor, T_b: torch.Tensor, pts_ct_mm: torch.Tensor) -> float:
    """Mean distance (mm) between the target points ``(N, 3)`` (CT, mm) placed by two ``(4, 4)`` poses: their mTRE."""
    from .eval.metrics import mtre

    return float(mtre(T_a.to(torch.float64), T_b.to(torch.float64), pts_ct_mm.to(torch.float64)))


def load_scr(models_dir: str, backend: str, device: str):
    """The SCR initialiser of a models folder (``scr.pt``; its network on the chosen back-end), or None.

    Raises
    ------
    ModelLoadError
        The files exist but cannot be used.
    """
    from pathlib import Path

    if not models_dir or not (Path(models_dir) / "scr.pt").exists():
        return None
    from .engines import load
    from .scr.model import SCRInitializer

    path = Path(models_dir) / "scr.pt"
    scr = SCRInitializer.load(path)
    scr.runner = load(path, "scr", backend, device)
    return scr
