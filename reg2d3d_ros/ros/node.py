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

    python -m reg2d3d_ros.ros.node --ros-args -p ct_path:=CT -p labels_path:=LABELS -p target:=T8
"""

from __future__ import annotations

import os

# Large images (1024x1024 mono16 at 30 Hz) are mostly lost with Fast DDS's default transports
# under best-effort QoS; the LARGE_DATA builtin transports deliver them. Must be set before the
# RMW is loaded, i.e. before rclpy is imported; an explicit user setting wins.
os.environ.setdefault("FASTDDS_BUILTIN_TRANSPORTS", "LARGE_DATA")

import logging  # noqa: E402
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

from ..errors import ConfigError, Reg2D3DError  # noqa: E402
from ..geometry.se3 import pose_m_to_transform, transform_to_pose_m  # noqa: E402
from ..pipeline import TRACKING, WAITING_FOR_CT, PipelineConfig, RegistrationPipeline  # noqa: E402
from ..settings import BY_NAME, SETTINGS, setting  # noqa: E402
from .lifecycle import enable_stack_dumps, exit_status, init_ros, shutdown_ros  # noqa: E402

#: The node's parameters, ``(name, default, description, unit, range or choices, read-only)``:
#: every setting of :data:`reg2d3d_ros.settings.SETTINGS` (the single definition), in its order.
PARAMETERS = [(x.name, x.default, x.description, x.unit, x.range if x.range is not None else x.choices, not x.runtime) for x in SETTINGS]

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


def check_parameter(name: str, value):
    """The value of parameter ``name`` in its declared type, or a :class:`ConfigError` saying what it takes.

    :meth:`reg2d3d_ros.settings.Setting.check`: an integer is taken for a floating-point
    parameter (``search_range_mm:=20``) and for a text parameter (``target:=29``: a label id); an
    integral number for an integer parameter; the error names the parameter, its unit and range.
    """
    return setting(name).check(value)


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
            spec = BY_NAME.get(prm.name)
            if spec is None:
                out.append(prm)
                continue
            if not spec.runtime:
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
            if prm.name in BY_NAME:
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
                    (self.get_logger().warn if getattr(note, "level", logging.INFO) >= logging.WARNING else self.get_logger().info)(note)
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
        self._last_mode = res.mode
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
    """Entry point (``python -m reg2d3d_ros.ros.node --ros-args ...``; the console script ``registration_node``)."""
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
