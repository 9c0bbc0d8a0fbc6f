"""ROS 2 node: registers C-arm frames to the CT and publishes the pose, TF, an overlay, diagnostics.

The contract is the project's ``INTERFACE.md``. This module is a thin layer over
:class:`reg2d3d_ros.pipeline.RegistrationPipeline`: the image callback only keeps the newest
frame (older unprocessed frames are dropped and counted), a worker thread loads the CT and then
processes the newest frame whenever one is waiting, and every output copies the input image's
header. Parameters are declared with descriptors; their defaults are mirrored in
``config/registration.yaml``. Start-up values are checked against the parameter table
(:func:`check_parameter`): an integer literal is taken for a floating-point parameter
(``search_range_mm:=20``) and for a text one (``target:=29``, a label id); a wrong type or an
out-of-range value ends the node with one line naming the parameter, its unit and range (exit
status 2). At run time such a set is refused with that reason and the node keeps running.

Run::

    python -m reg2d3d_ros.registration_node --ros-args -p ct_path:=CT -p labels_path:=LABELS -p target:=T8
"""

from __future__ import annotations

import os

# Large images (1024x1024 mono16 at 30 Hz) are mostly lost with Fast DDS's default transports
# under best-effort QoS; the LARGE_DATA builtin transports deliver them. Must be set before the
# RMW is loaded, i.e. before rclpy is imported; an explicit user setting wins.
os.environ.setdefault("FASTDDS_BUILTIN_TRANSPORTS", "LARGE_DATA")

import logging  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections import deque  # noqa: E402

import torch  # noqa: E402
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue  # noqa: E402
from geometry_msgs.msg import PoseStamped, TransformStamped  # noqa: E402
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor  # noqa: E402
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.node import Node  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from rclpy.qos import QoSProfile, qos_profile_sensor_data  # noqa: E402
from sensor_msgs.msg import CameraInfo, Image  # noqa: E402
from std_srvs.srv import Trigger  # noqa: E402
from tf2_msgs.msg import TFMessage  # noqa: E402

from .errors import ConfigError, Reg2D3DError  # noqa: E402
from .geometry.se3 import pose_m_to_transform, transform_to_pose_m  # noqa: E402
from .ros.lifecycle import enable_stack_dumps, exit_status, init_ros, shutdown_ros  # noqa: E402
from .pipeline import INTENSITY_STAGES, TRACKERS, TRACKING, WAITING_FOR_CT, PipelineConfig, RegistrationPipeline  # noqa: E402
from .volume import LABEL_SET_CHOICES  # noqa: E402

#: The pipeline's defaults: a parameter that is a pipeline setting takes its default from there.
_D = PipelineConfig()

#: (name, default, description, unit, range (lo, hi) or choices, read_only)
PARAMETERS = [
    ("ct_path", _D.ct_path, "CT volume: NIfTI, NRRD or MHA file, or a DICOM series folder", "", None, True),
    ("labels_path", _D.labels_path, "label map of the CT (e.g. TotalSegmentator) used to select the target", "", None, True),
    ("label_table_path", _D.label_table_path, "CSV naming the labels (columns structure,id); empty: TotalSegmentator's names, built in (label_set)", "", None, True),
    ("label_set", _D.label_set, "label ids of the built-in names (used when label_table_path is empty): totalseg_v2 (TotalSegmentator v2, task total, "
     "117 classes) or totalseg_v1 (v1, 104 classes); auto: the version the label map shows (ids above 104, or where its vertebrae are), "
     "else totalseg_v2", "", LABEL_SET_CHOICES, True),
    ("resample_labels", _D.resample_labels, "a label map on another grid than the CT (size, spacing, origin, direction) is resampled onto the CT grid "
     "(nearest neighbour, said in the log) instead of being an error", "", None, True),
    ("target", _D.target, "structure to register: a TotalSegmentator name (vertebrae_L3), a vertebra's short name (L3) or a label id (29)", "", None, True),
    ("intensity", _D.intensity, "pixel meaning: attenuation (bright = material) or transmission (bright = photons)", "", ("attenuation", "transmission"), True),
    ("tracker", _D.tracker, "update operator of registration and tracking: ppc (classic), ppc_l (learned correspondence weights), "
     "ppc_l_plus (learned at coarse levels, classic at full resolution), ppc_l_hybrid (learned weights inside the classic update), "
     "ppc_flow_plus (PPC Flow Attention at the coarsest level); "
     "the learned ones need ppcl.pt / ppcflow.pt in models_dir", "", TRACKERS, True),
    ("models_dir", _D.models_dir, "model folder written by python -m reg2d3d_ros.prepare for this CT (scr.pt/scr.onnx: the SCR-PnP initialiser, "
     "used when no initial pose is given; ppcl.pt / ppcflow.pt: the learned update operators; similarity.pt: the learned similarity); every model file in it is checked at start-up; '' for none", "", None, True),
    ("backend", _D.backend, "inference back-end of the networks (auto: TensorRT > PyTorch CUDA > ONNX Runtime CPU > PyTorch CPU; an unavailable one falls back with a warning)", "", ("auto", "tensorrt", "onnxruntime", "pytorch"), True),
    ("device", _D.device, "inference device (auto: cuda if available)", "", ("auto", "cpu", "cuda"), True),
    ("recover", _D.recover, "recovery stage when tracking is lost and SCR-PnP is rejected or unavailable (gc recommended: reports/intensity/report_recover.md): intensity-based registration "
     "(this similarity, gradient ascent + CMA-ES) from the last good pose before PPC; learned: the learned similarity, similarity.pt in models_dir; learned_gc: learned, then gc; off: PPC from the last good pose", "", INTENSITY_STAGES, True),
    ("refine", _D.refine, "refinement of every initial pose (SCR-PnP or initial_pose) by intensity-based registration (this similarity, gradient + CMA-ES) "
     "before PPC (learned: similarity.pt in models_dir)", "", INTENSITY_STAGES, True),
    ("moving_image", _D.moving_image, "what PPC's moving image (the DRR whose edges are matched) shows: target (the target's bone only), roi (all bone "
     "of the crop around it, neighbours included) or auto (roi for the classic tracker, target for the learned ones, which were trained "
     "with it; reports/ppc_search/report.md)", "", ("auto", "target", "roi"), True),
    ("search_range_mm", _D.search_range_mm, "global in-plane search of every PPC (re-)initialisation: image-plane shifts up to this far from the start "
     "(at the target's depth) and rotations about the principal ray, scored by gradient correlation; PPC runs from the start and the best "
     "candidates (reports/ppc_search/report.md); 0: off", "mm", (0.0, 100.0), True),
    ("polish", _D.polish, "polish every PPC (re-)initialisation by gradient ascent on the gradient correlation of the moving image with the frame, "
     "every degree of freedom but depth (more precise than PPC alone, about 2-3 s more on 2 CPU cores; reports/ppc_polish/report.md); the acceptance "
     "checks look at the pose before the polish", "", None, True),
    ("guard", _D.guard, "judge every PPC (re-)initialisation's updates by the gradient correlation of the moving image with the frame (an update "
     "that lowers it is halved, reduced to its in-plane part or rejected) and pick the in-plane search's best start by it; about three times "
     "the PPC's time (reports/ppc_guard/report.md)", "", None, True),
    ("intensity_budget_s", _D.intensity_budget_s, "wall-time budget of the CMA-ES part of a recovery or refinement", "s", (0.0, 60.0), True),
    ("ct_frame", "ct", "TF child frame of the CT", "", None, True),
    ("image_topic", "/carm/image", "input frames (sensor_msgs/Image: mono8, mono16, 32FC1)", "", None, True),
    ("camera_info_topic", "/carm/camera_info", "input intrinsics (sensor_msgs/CameraInfo)", "", None, True),
    ("initial_pose_topic", "/registration/initial_pose", "optional pose guess (geometry_msgs/PoseStamped)", "", None, True),
    ("pose_topic", "/registration/pose", "output pose T_optical_from_ct (geometry_msgs/PoseStamped)", "", None, True),
    ("overlay_topic", "/registration/overlay", "output overlay (sensor_msgs/Image rgb8)", "", None, True),
    ("publish_overlay", True, "publish the overlay image for every registered frame", "", None, False),
    ("lost_inlier_fraction", _D.lost_inlier_fraction, "tracking is judged lost below this inlier fraction of the contour correspondences", "fraction", (0.0, 1.0), False),
    ("lost_relative_fraction", _D.lost_relative_fraction, "tracking is judged lost when the inlier fraction drops below this fraction of its recent level", "fraction", (0.0, 1.0), False),
    ("lost_relative_gc", _D.lost_relative_gc, "tracking is judged lost when the gradient correlation of the moving image with the frame at the pose "
     "drops below this fraction of its recent level (a per-sequence baseline: the absolute level changes with contrast and dose); 0: off",
     "fraction", (0.0, 1.0), False),
    ("max_peak_offset_mm", _D.max_peak_offset_mm, "every registration is compared with in-plane shifts of itself: when the frame matches the "
     "target best more than this far from the pose, nothing is published (lost / initialisation rejected); 0: off", "mm", (0.0, 50.0), False),
    ("peak_correction", _D.peak_correction, "move a tracked pose onto the peak of that comparison when it lies 0.5 mm to max_peak_offset_mm "
     "beside it (in-plane, sub-pixel): removes the slow drift of the contour updates", "", None, False),
    ("track_guard", _D.track_guard, "keep the previous pose when the tracked pose correlates less with the frame than the previous pose "
     "(stops noise from walking a still view away)", "", None, False),
    ("track_dof", _D.track_dof, "degrees of freedom of the per-frame tracking update: in_plane (rotation about the principal ray, image-plane "
     "translation) or no_depth (then also the out-of-plane rotations: follows a C-arm sweep)", "", ("in_plane", "no_depth"), True),
    ("motion_prediction", _D.motion_prediction, "each tracked frame starts from the previous pose moved on by this fraction of the last "
     "frame-to-frame motion (constant velocity, damped); 0: from the previous pose", "fraction", (0.0, 1.0), True),
    ("accept_inlier_fraction", _D.accept_inlier_fraction, "a (re-)initialisation with a lower inlier fraction publishes nothing (initialisation rejected: a wrong optimum "
     "usually fits fewer correspondences); 0: off", "fraction", (0.0, 1.0), False),
    ("accept_gradient_correlation", _D.accept_gradient_correlation, "a (re-)initialisation whose moving image correlates less with the frame (gradient correlation at half "
     "resolution) publishes nothing (chosen with the roi moving image; reports/ppc_search/report.md); 0: off", "", (0.0, 1.0), False),
    ("min_correspondences", _D.min_correspondences, "tracking is judged lost with fewer contour correspondences", "count", (0, 100000), False),
    ("diagnostics_period", 1.0, "period of /diagnostics messages", "s", (0.05, 60.0), True),
]


_SPECS = {spec[0]: spec for spec in PARAMETERS}


def _descriptor(name, default, description, unit, rng, read_only) -> ParameterDescriptor:
    text = description + (f" [{unit}]" if unit else "")
    d = ParameterDescriptor(name=name, description=text, read_only=read_only, type=Parameter.Type.from_parameter_value(default).value)
    if isinstance(rng, tuple) and len(rng) == 2 and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in rng):
        if isinstance(default, float):
            d.floating_point_range = [FloatingPointRange(from_value=float(rng[0]), to_value=float(rng[1]), step=0.0)]
        else:
            d.integer_range = [IntegerRange(from_value=int(rng[0]), to_value=int(rng[1]), step=1)]
    elif rng is not None:
        d.additional_constraints = "one of: " + ", ".join(rng)
    return d


def _expected(name: str) -> str:
    """What parameter ``name`` takes, for messages (``a number in [0, 100] (unit: mm)``)."""
    _, default, _, unit, rng, _ = _SPECS[name]
    numeric = isinstance(rng, tuple) and len(rng) == 2 and not isinstance(rng[0], str)
    unit_text = f" (unit: {unit})" if unit else ""
    if isinstance(default, bool):
        return "true or false"
    if isinstance(default, float):
        return (f"a number in [{rng[0]:g}, {rng[1]:g}]" if numeric else "a number") + unit_text
    if isinstance(default, int):
        return (f"an integer in [{rng[0]}, {rng[1]}]" if numeric else "an integer") + unit_text
    if rng is not None:
        return "one of " + ", ".join(rng)
    return "text"


def _shown(value) -> str:
    """A parameter value as the user wrote it, with its type where that was the problem."""
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, int):
        return f"{value} (an integer)"
    if isinstance(value, float):
        return f"{value:g} (a number)"
    if isinstance(value, str):
        return f"{value!r} (text)"
    return f"{value!r} (a {type(value).__name__})" if value is not None else "nothing (the parameter was unset)"


def check_parameter(name: str, value):
    """The value of parameter ``name`` in its declared type, or a :class:`ConfigError` saying what it takes.

    An integer is taken for a floating-point parameter (``search_range_mm:=20``) and for a text
    parameter (``target:=29``: a label id); an integral number for an integer parameter.

    Parameters
    ----------
    name : str
        A parameter of :data:`PARAMETERS`.
    value : bool, int, float, str or other
        Its value as rclpy has it (from ``-p name:=value``, a parameter file or a set request).

    Returns
    -------
    bool, int, float or str
        The value in the type of the parameter's default.

    Raises
    ------
    ConfigError
        Wrong type, out of range, or not one of the choices (names the parameter, unit and range).
    """
    _, default, _, _, rng, _ = _SPECS[name]
    numeric = isinstance(rng, tuple) and len(rng) == 2 and not isinstance(rng[0], str)
    wrong_type = ConfigError(f"parameter {name} must be {_expected(name)}; got {_shown(value)}")
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise wrong_type
        return value
    if isinstance(default, (int, float)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise wrong_type
        if isinstance(default, float):
            value = float(value)
        elif isinstance(value, float):
            if not value.is_integer():
                raise wrong_type
            value = int(value)
        if numeric and not (math.isfinite(value) and rng[0] <= value <= rng[1]):
            raise ConfigError(f"parameter {name} must be {_expected(name)}; got {value:g}")
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)  # an integer literal for a text parameter: e.g. a label id
    if not isinstance(value, str):
        raise wrong_type
    if rng is not None and value not in rng:
        raise ConfigError(f"parameter {name} must be {_expected(name)}; got {value!r}")
    return value


class _RosLogHandler(logging.Handler):
    """Forwards the library's Python log records (``reg2d3d_ros.*``: e.g. the label map's notes) to the node's logger."""

    def __init__(self, ros_logger):
        super().__init__(level=logging.INFO)
        self.ros_logger = ros_logger

    def emit(self, record):
        try:
            text = record.getMessage()
            if record.levelno >= logging.ERROR:
                self.ros_logger.error(text)
            elif record.levelno >= logging.WARNING:
                self.ros_logger.warning(text)
            else:
                self.ros_logger.info(text)
        except Exception:  # logging must never take the node down
            self.handleError(record)


class RegistrationNode(Node):
    """The registration node (see the module docstring)."""

    def __init__(self, **kwargs):
        super().__init__("registration_node", **kwargs)
        self.params = p = self._declare_parameters()
        self._log_handler = _RosLogHandler(self.get_logger())
        lib_log = logging.getLogger("reg2d3d_ros")
        lib_log.addHandler(self._log_handler)
        if lib_log.getEffectiveLevel() > logging.INFO:
            lib_log.setLevel(logging.INFO)
        self.pipeline = RegistrationPipeline(
            # every node parameter that is a pipeline setting, by name (the table above is the one list)
            PipelineConfig(**{name: p[name] for name in PipelineConfig.__dataclass_fields__ if name in p})
        )
        self.add_pre_set_parameters_callback(self._on_pre_set_parameters)
        self.add_on_set_parameters_callback(self._on_set_parameters)
        reliable = QoSProfile(depth=10)
        self.pose_pub = self.create_publisher(PoseStamped, p["pose_topic"], reliable)
        self.tf_pub = self.create_publisher(TFMessage, "/tf", QoSProfile(depth=100))
        self.overlay_pub = self.create_publisher(Image, p["overlay_topic"], qos_profile_sensor_data)
        self.diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", reliable)
        self.create_subscription(Image, p["image_topic"], self._on_image, qos_profile_sensor_data)
        self.create_subscription(CameraInfo, p["camera_info_topic"], self._on_camera_info, qos_profile_sensor_data)
        self.create_subscription(PoseStamped, p["initial_pose_topic"], self._on_initial_pose, reliable)
        self.create_service(Trigger, "~/reset", self._on_reset)
        self.create_timer(p["diagnostics_period"], self._publish_diagnostics)

        self._cond = threading.Condition()
        self._pending = None  # (Image, receive time) of the newest unprocessed frame
        self._stop = False
        self.frames_received = 0
        self.frames_processed = 0
        self.frames_dropped = 0
        self.poses_published = 0
        self.last_error = ""
        self._last_logged = {}
        self._rx_times = deque(maxlen=200)
        self._latencies_ms = deque(maxlen=100)
        self._last_confidence = 0.0
        self._last_mode = ""
        self._last_scr = ""
        self._last_intensity = ""  # the last recover/refine stage, for diagnostics
        self._last_init = ""  # the last (re-)initialisation's in-plane search and acceptance check, for diagnostics
        self._worker = threading.Thread(target=self._run, name="registration_worker", daemon=True)
        self._worker.start()

    # -- callbacks (cheap: they only store) ------------------------------------------------
    def _on_image(self, msg: Image) -> None:
        now = time.monotonic()
        with self._cond:
            self.frames_received += 1
            self._rx_times.append(now)
            if self._pending is not None:
                self.frames_dropped += 1  # newest frame wins
            self._pending = (msg, now)
            self._cond.notify()

    def _on_camera_info(self, msg: CameraInfo) -> None:
        try:
            self.pipeline.set_camera_info(list(msg.k), msg.width, msg.height)
        except Reg2D3DError as exc:
            self._error(f"camera_info rejected: {exc}")

    def _on_initial_pose(self, msg: PoseStamped) -> None:
        p, q = msg.pose.position, msg.pose.orientation
        T = pose_m_to_transform(torch.tensor([p.x, p.y, p.z], dtype=torch.float64), torch.tensor([q.x, q.y, q.z, q.w], dtype=torch.float64))
        try:
            self.pipeline.set_initial_pose(T)
            self.get_logger().info("initial pose received: the next frame is initialised from it")
        except Reg2D3DError as exc:
            self._error(f"initial pose rejected: {exc}")

    def _on_reset(self, request, response):
        self.pipeline.reset()
        response.success = True
        response.message = "pose forgotten; the next frame is initialised afresh"
        self.get_logger().info("reset: " + response.message)
        return response

    def _declare_parameters(self) -> dict:
        """Declare the table's parameters; returns their checked start-up values (:func:`check_parameter`).

        They are declared with dynamic typing first, so that rclpy takes any override (an integer
        for a double) and the check below words the error; then each gets its final descriptor
        (declared type, range, read-only) with the checked value.

        Raises
        ------
        ConfigError
            Every parameter whose start-up value is wrong, in one message.
        """
        for name, default, description, unit, rng, _ro in PARAMETERS:
            loose = ParameterDescriptor(name=name, description=description + (f" [{unit}]" if unit else ""), dynamic_typing=True)
            self.declare_parameter(name, default, loose)
        values, problems = {}, []
        for name, *_ in PARAMETERS:
            try:
                values[name] = check_parameter(name, self.get_parameter(name).value)
            except ConfigError as exc:
                problems.append(str(exc))
        if problems:
            raise ConfigError("; ".join(problems))
        for spec in PARAMETERS:
            name = spec[0]
            self.set_descriptor(name, _descriptor(*spec), alternative_value=Parameter(name, value=values[name]).get_parameter_value())
        return values

    def _on_pre_set_parameters(self, params):
        """Before rclpy checks a run-time set: integers for double parameters become doubles; a wrong value is logged (rclpy refuses it)."""
        out = []
        for prm in params:
            spec = _SPECS.get(prm.name)
            if spec is None:
                out.append(prm)
                continue
            if spec[5]:
                self.get_logger().warning(f"run-time set refused: parameter {prm.name} is read-only (set it when the node starts)")
                out.append(prm)
                continue
            try:
                out.append(Parameter(prm.name, value=check_parameter(prm.name, prm.value)))
            except ConfigError as exc:
                self.get_logger().warning(f"run-time set refused: {exc}")
                out.append(prm)
        return out

    def _on_set_parameters(self, params):
        from rcl_interfaces.msg import SetParametersResult

        for prm in params:
            if prm.name in _SPECS:
                try:
                    check_parameter(prm.name, prm.value)
                except ConfigError as exc:
                    return SetParametersResult(successful=False, reason=str(exc))
        for prm in params:
            if prm.name in PipelineConfig.__dataclass_fields__:  # writable pipeline settings: checked above
                setattr(self.pipeline.config, prm.name, check_parameter(prm.name, prm.value))
            elif prm.name == "publish_overlay":
                self.params["publish_overlay"] = bool(prm.value)
        return SetParametersResult(successful=True)

    # -- worker --------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self.get_logger().info(f"loading CT {self.params['ct_path']!r} and target {self.params['target']!r}")
            t0 = time.perf_counter()
            self.pipeline.load()
            init = "SCR-PnP initialiser loaded" if self.pipeline.scr is not None else "no SCR model: initial poses come from /registration/initial_pose"
            for engine in self.pipeline.engines:  # back-end choices, fall-backs, exports and TensorRT builds
                for note in engine.notes:
                    (self.get_logger().warn if "falling back" in note or "asked for" in note else self.get_logger().info)(note)
            self.get_logger().info(f"ready in {time.perf_counter() - t0:.1f} s (back-end {self.pipeline.backend}, device "
                                   f"{self.pipeline.device}, {len(self.pipeline.models)} model file(s); {init}): waiting for frames")
        except Reg2D3DError as exc:
            self.pipeline.fail_load(str(exc))
            self._error(f"cannot start: {exc}")
        except Exception as exc:  # a bug: report it on diagnostics instead of dying silently
            self.pipeline.fail_load(f"internal error while loading: {exc!r}")
            self.get_logger().error(f"internal error while loading: {exc!r}")
        while True:
            with self._cond:
                while self._pending is None and not self._stop:
                    self._cond.wait(timeout=0.5)
                if self._stop:
                    return
                msg, t_rx = self._pending
                self._pending = None
            try:
                self._process(msg, t_rx)
            except Exception as exc:  # keep running on any per-frame failure
                self._error(f"internal error on a frame: {exc!r}")

    def _process(self, msg: Image, t_rx: float) -> None:
        res = self.pipeline.process(msg.encoding, msg.height, msg.width, msg.step, msg.data, msg.is_bigendian)
        self.frames_processed += 1
        self._last_confidence = res.confidence
        self._last_mode = str(res.details.get("mode", ""))
        for stage in ("recover", "refine"):
            if stage in res.details:
                d = res.details[stage]
                self._last_intensity = f"{stage} ({d['metric']}): similarity {d['start_similarity']:.3f} -> {d['similarity']:.3f}, {d['ms']:.0f} ms"
        if "search_candidate" in res.details or "gradient_correlation" in res.details or "polish" in res.details:
            cand = res.details.get("search_candidate")
            gc = res.details.get("gradient_correlation")
            pol = res.details.get("polish")
            self._last_init = ", ".join(x for x in (
                "" if cand is None else ("start kept" if cand == 0 else f"in-plane search candidate {cand}"),
                "" if gc is None else f"gradient correlation {gc:.3f}",
                "" if pol is None else (f"polish moved {pol['moved_mm']:.2f} mm in {pol['ms']:.0f} ms" if pol["kept"]
                                        else f"polish discarded (moved {pol['moved_mm']:.1f} mm, gradient correlation "
                                             f"{pol['gc_before']:.3f} -> {pol['gc_after']:.3f})"),
                "published" if res.T_optical_from_ct is not None else "rejected") if x)
        if "scr_inliers" in res.details:
            self._last_scr = f"{res.details['scr_inliers']} inliers ({res.details['scr_inlier_fraction']:.2f}), {res.details['scr_ms']:.0f} ms"
        if res.T_optical_from_ct is None:
            if res.error:
                self._error(res.error)
            self._publish_overlay(msg, res, t_rx)  # the frame, marked: no pose (lost, rejected, waiting)
            return
        pos, quat = transform_to_pose_m(res.T_optical_from_ct)
        pos, quat = pos.tolist(), quat.tolist()
        pose = PoseStamped()
        pose.header = msg.header
        pose.pose.position.x, pose.pose.position.y, pose.pose.position.z = pos
        o = pose.pose.orientation
        o.x, o.y, o.z, o.w = quat
        self.pose_pub.publish(pose)
        tf = TransformStamped()
        tf.header = msg.header
        tf.child_frame_id = self.params["ct_frame"]
        tr = tf.transform.translation
        tr.x, tr.y, tr.z = pos
        r = tf.transform.rotation
        r.x, r.y, r.z, r.w = quat
        self.tf_pub.publish(TFMessage(transforms=[tf]))
        self.poses_published += 1
        self._latencies_ms.append(1e3 * (time.monotonic() - t_rx))
        self._publish_overlay(msg, res, t_rx)

    def _publish_overlay(self, msg: Image, res, t_rx: float) -> None:
        """The overlay of a processed frame (``rgb8``, header copied from the frame), when someone listens.

        At the published pose: the target's projected outline (and its neighbours', fainter) on the
        contrast-normalised frame, with the state, the confidence and the latency (reception to
        the pose's publication). A frame that got no pose is published without an outline, with a
        red border and the reason; a frame that could not be decoded gets no overlay.
        """
        if not self.params["publish_overlay"] or res.image is None or self.overlay_pub.get_subscription_count() == 0:
            return
        latency_ms = self._latencies_ms[-1] if res.T_optical_from_ct is not None and self._latencies_ms else \
            1e3 * (time.monotonic() - t_rx)
        rgb = self.pipeline.overlay(res, latency_ms=latency_ms)
        out = Image()
        out.header = msg.header
        out.height, out.width = rgb.shape[:2]
        out.encoding = "rgb8"
        out.step = 3 * out.width
        out.data = rgb.tobytes()
        self.overlay_pub.publish(out)

    # -- reporting -------------------------------------------------------------------------
    def _error(self, text: str) -> None:
        """One log line per problem (identical messages at most every 5 s), kept for diagnostics."""
        self.last_error = text
        now = time.monotonic()
        last = self._last_logged.get(text)
        if last is None or now - last > 5.0:
            self._last_logged[text] = now
            self.get_logger().warning(text)

    def _publish_diagnostics(self) -> None:
        state = self.pipeline.state
        now = time.monotonic()
        recent = [t for t in self._rx_times if now - t < 5.0]
        rate = (len(recent) - 1) / (recent[-1] - recent[0]) if len(recent) > 1 and recent[-1] > recent[0] else 0.0
        lat = sorted(self._latencies_ms)
        st = DiagnosticStatus()
        st.name = "reg2d3d_ros: registration"
        st.hardware_id = self.params["ct_path"]
        if state == TRACKING:
            st.level = DiagnosticStatus.OK
        elif state == WAITING_FOR_CT and self.pipeline.last_error:
            st.level = DiagnosticStatus.ERROR
        else:
            st.level = DiagnosticStatus.WARN
        st.message = state + (f": {self.last_error}" if self.last_error and state != TRACKING else "")
        values = {
            "state": state,
            "input_rate_hz": f"{rate:.2f}",
            "latency_ms_median": f"{lat[len(lat) // 2]:.1f}" if lat else "",
            "latency_ms_max": f"{lat[-1]:.1f}" if lat else "",
            "frames_received": str(self.frames_received),
            "frames_processed": str(self.frames_processed),
            "frames_dropped": str(self.frames_dropped),
            "poses_published": str(self.poses_published),
            "confidence": f"{self._last_confidence:.3f}",
            "last_mode": self._last_mode,
            "initialiser": "scr" if self.pipeline.scr is not None else "initial_pose topic",
            "last_scr": self._last_scr,
            "last_intensity_stage": self._last_intensity,
            "last_initialisation": self._last_init,
            "backend": self.pipeline.backend,
            "engines": ", ".join(f"{e.name}:{e.backend}/{e.device}" for e in self.pipeline.engines),
            "device": self.pipeline.device,
            "last_error": self.last_error or self.pipeline.last_error,
        }
        st.values = [KeyValue(key=k, value=v) for k, v in values.items()]
        arr = DiagnosticArray()
        arr.header.stamp = self.get_clock().now().to_msg()
        arr.status = [st]
        self.diag_pub.publish(arr)

    def destroy_node(self):
        # also called (by rclpy's shutdown) on a node whose __init__ failed part-way
        cond = getattr(self, "_cond", None)
        if cond is not None:
            with cond:
                self._stop = True
                cond.notify()
        worker = getattr(self, "_worker", None)
        if worker is not None and worker.is_alive():
            worker.join(timeout=5.0)
        handler = getattr(self, "_log_handler", None)
        if handler is not None:
            logging.getLogger("reg2d3d_ros").removeHandler(handler)
            self._log_handler = None
        return super().destroy_node()


def main(argv=None) -> int:
    """Entry point (``python -m reg2d3d_ros.registration_node --ros-args ...``)."""
    enable_stack_dumps()
    stop = init_ros(argv if argv is not None else sys.argv)
    node = None
    rc = 0
    try:
        node = RegistrationNode()
        executor = SingleThreadedExecutor()
        executor.add_node(node)
        while not stop.is_set():
            executor.spin_once(timeout_sec=0.1)
    except Reg2D3DError as exc:
        print(f"registration_node: error: {exc}", file=sys.stderr)
        rc = 2
    finally:
        shutdown_ros(node)
    return exit_status(rc)


if __name__ == "__main__":
    sys.exit(main())
