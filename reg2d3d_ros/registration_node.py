"""ROS 2 node: registers C-arm frames to the CT and publishes the pose, TF, an overlay, diagnostics.

The contract is the project's ``INTERFACE.md``. This module is a thin layer over
:class:`reg2d3d_ros.pipeline.RegistrationPipeline`: the image callback only keeps the newest
frame (older unprocessed frames are dropped and counted), a worker thread loads the CT and then
processes the newest frame whenever one is waiting, and every output copies the input image's
header. Parameters are declared with descriptors; their defaults are mirrored in
``config/registration.yaml``.

Run::

    python -m reg2d3d_ros.registration_node --ros-args -p ct_path:=CT -p labels_path:=LABELS -p target:=T8
"""

from __future__ import annotations

import os

# Large images (1024x1024 mono16 at 30 Hz) are mostly lost with Fast DDS's default transports
# under best-effort QoS; the LARGE_DATA builtin transports deliver them. Must be set before the
# RMW is loaded, i.e. before rclpy is imported; an explicit user setting wins.
os.environ.setdefault("FASTDDS_BUILTIN_TRANSPORTS", "LARGE_DATA")

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
from rclpy.qos import QoSProfile, qos_profile_sensor_data  # noqa: E402
from sensor_msgs.msg import CameraInfo, Image  # noqa: E402
from std_srvs.srv import Trigger  # noqa: E402
from tf2_msgs.msg import TFMessage  # noqa: E402

from .errors import Reg2D3DError  # noqa: E402
from .geometry.se3 import pose_m_to_transform, transform_to_pose_m  # noqa: E402
from .ros.lifecycle import enable_stack_dumps, exit_status, init_ros, shutdown_ros  # noqa: E402
from .pipeline import INTENSITY_STAGES, TRACKERS, TRACKING, WAITING_FOR_CT, PipelineConfig, RegistrationPipeline  # noqa: E402

#: (name, default, description, unit, range (lo, hi) or choices, read_only)
PARAMETERS = [
    ("ct_path", "", "CT volume: NIfTI, NRRD or MHA file, or a DICOM series folder", "", None, True),
    ("labels_path", "", "label map of the CT (e.g. TotalSegmentator) used to select the target", "", None, True),
    ("label_table_path", "", "CSV naming the labels (columns structure,id); empty if target is an id", "", None, True),
    ("target", "T8", "structure to register: a label name (e.g. T8) or id", "", None, True),
    ("intensity", "attenuation", "pixel meaning: attenuation (bright = material) or transmission (bright = photons)", "", ("attenuation", "transmission"), True),
    ("tracker", "ppc", "update operator of registration and tracking: ppc (classic), ppc_l (learned correspondence weights), "
     "ppc_l_plus (learned at coarse levels, classic at full resolution), ppc_l_hybrid (learned weights inside the classic update), "
     "ppc_flow_plus (PPC Flow Attention at the coarsest level); "
     "the learned ones need ppcl.pt / ppcflow.pt in models_dir", "", TRACKERS, True),
    ("models_dir", "", "model folder written by python -m reg2d3d_ros.prepare for this CT (scr.pt/scr.onnx: the SCR-PnP initialiser, "
     "used when no initial pose is given; ppcl.pt / ppcflow.pt: the learned update operators; similarity.pt: the learned similarity); every model file in it is checked at start-up; '' for none", "", None, True),
    ("backend", "auto", "inference back-end of the networks (auto: TensorRT > PyTorch CUDA > ONNX Runtime CPU > PyTorch CPU; an unavailable one falls back with a warning)", "", ("auto", "tensorrt", "onnxruntime", "pytorch"), True),
    ("device", "auto", "inference device (auto: cuda if available)", "", ("auto", "cpu", "cuda"), True),
    ("recover", "off", "recovery stage when tracking is lost and SCR-PnP is rejected or unavailable (gc recommended: reports/intensity/report_recover.md): intensity-based registration "
     "(this similarity, gradient ascent + CMA-ES) from the last good pose before PPC; learned: the learned similarity, similarity.pt in models_dir; learned_gc: learned, then gc; off: PPC from the last good pose", "", INTENSITY_STAGES, True),
    ("refine", "off", "refinement of every initial pose (SCR-PnP or initial_pose) by intensity-based registration (this similarity, gradient + CMA-ES) "
     "before PPC (learned: similarity.pt in models_dir)", "", INTENSITY_STAGES, True),
    ("moving_image", "auto", "what PPC's moving image (the DRR whose edges are matched) shows: target (the target's bone only), roi (all bone "
     "of the crop around it, neighbours included) or auto (roi for the classic tracker, target for the learned ones, which were trained "
     "with it; reports/ppc_search/report.md)", "", ("auto", "target", "roi"), True),
    ("search_range_mm", 30.0, "global in-plane search of every PPC (re-)initialisation: image-plane shifts up to this far from the start "
     "(at the target's depth) and rotations about the principal ray, scored by gradient correlation; PPC runs from the start and the best "
     "candidates (reports/ppc_search/report.md); 0: off", "mm", (0.0, 100.0), True),
    ("intensity_budget_s", 2.0, "wall-time budget of the CMA-ES part of a recovery or refinement", "s", (0.0, 60.0), True),
    ("ct_frame", "ct", "TF child frame of the CT", "", None, True),
    ("image_topic", "/carm/image", "input frames (sensor_msgs/Image: mono8, mono16, 32FC1)", "", None, True),
    ("camera_info_topic", "/carm/camera_info", "input intrinsics (sensor_msgs/CameraInfo)", "", None, True),
    ("initial_pose_topic", "/registration/initial_pose", "optional pose guess (geometry_msgs/PoseStamped)", "", None, True),
    ("pose_topic", "/registration/pose", "output pose T_optical_from_ct (geometry_msgs/PoseStamped)", "", None, True),
    ("overlay_topic", "/registration/overlay", "output overlay (sensor_msgs/Image rgb8)", "", None, True),
    ("publish_overlay", True, "publish the overlay image for every registered frame", "", None, False),
    ("lost_inlier_fraction", 0.3, "tracking is judged lost below this inlier fraction of the contour correspondences", "fraction", (0.0, 1.0), False),
    ("lost_relative_fraction", 0.85, "tracking is judged lost when the inlier fraction drops below this fraction of its recent level", "fraction", (0.0, 1.0), False),
    ("accept_inlier_fraction", 0.0, "a (re-)initialisation with a lower inlier fraction publishes nothing (initialisation rejected: a wrong optimum "
     "usually fits fewer correspondences); 0: off", "fraction", (0.0, 1.0), False),
    ("accept_gradient_correlation", 0.3, "a (re-)initialisation whose moving image correlates less with the frame (gradient correlation at half "
     "resolution) publishes nothing (chosen with the roi moving image; reports/ppc_search/report.md); 0: off", "", (0.0, 1.0), False),
    ("min_correspondences", 30, "tracking is judged lost with fewer contour correspondences", "count", (0, 100000), False),
    ("diagnostics_period", 1.0, "period of /diagnostics messages", "s", (0.05, 60.0), True),
]


def _descriptor(name, default, description, unit, rng, read_only) -> ParameterDescriptor:
    text = description + (f" [{unit}]" if unit else "")
    d = ParameterDescriptor(name=name, description=text, read_only=read_only)
    if isinstance(rng, tuple) and len(rng) == 2 and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in rng):
        if isinstance(default, float):
            d.floating_point_range = [FloatingPointRange(from_value=float(rng[0]), to_value=float(rng[1]), step=0.0)]
        else:
            d.integer_range = [IntegerRange(from_value=int(rng[0]), to_value=int(rng[1]), step=1)]
    elif rng is not None:
        d.additional_constraints = "one of: " + ", ".join(rng)
    return d


class RegistrationNode(Node):
    """The registration node (see the module docstring)."""

    def __init__(self, **kwargs):
        super().__init__("registration_node", **kwargs)
        for name, default, description, unit, rng, read_only in PARAMETERS:
            self.declare_parameter(name, default, _descriptor(name, default, description, unit, rng, read_only))
        p = {name: self.get_parameter(name).value for name, *_ in PARAMETERS}
        for name, _d, _desc, _unit, rng, _ro in PARAMETERS:
            if isinstance(rng, tuple) and isinstance(rng[0], str) and p[name] not in rng:
                raise Reg2D3DError(f"parameter {name} must be one of {rng}, got {p[name]!r}")
        self.params = p
        self.pipeline = RegistrationPipeline(
            PipelineConfig(
                ct_path=p["ct_path"], labels_path=p["labels_path"], label_table_path=p["label_table_path"], target=p["target"],
                intensity=p["intensity"], tracker=p["tracker"], lost_inlier_fraction=p["lost_inlier_fraction"],
                lost_relative_fraction=p["lost_relative_fraction"],
                min_correspondences=p["min_correspondences"], accept_inlier_fraction=p["accept_inlier_fraction"],
                accept_gradient_correlation=p["accept_gradient_correlation"], models_dir=p["models_dir"], backend=p["backend"], device=p["device"],
                recover=p["recover"], refine=p["refine"], intensity_budget_s=p["intensity_budget_s"], moving_image=p["moving_image"],
                search_range_mm=p["search_range_mm"],
            )
        )
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

    def _on_set_parameters(self, params):
        from rcl_interfaces.msg import SetParametersResult

        for prm in params:
            if prm.name == "lost_inlier_fraction":
                self.pipeline.config.lost_inlier_fraction = float(prm.value)
            elif prm.name == "lost_relative_fraction":
                self.pipeline.config.lost_relative_fraction = float(prm.value)
            elif prm.name == "min_correspondences":
                self.pipeline.config.min_correspondences = int(prm.value)
            elif prm.name in ("accept_inlier_fraction", "accept_gradient_correlation"):
                setattr(self.pipeline.config, prm.name, float(prm.value))
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
        if "search_candidate" in res.details or "gradient_correlation" in res.details:
            cand = res.details.get("search_candidate")
            gc = res.details.get("gradient_correlation")
            self._last_init = ", ".join(x for x in (
                "" if cand is None else ("start kept" if cand == 0 else f"in-plane search candidate {cand}"),
                "" if gc is None else f"gradient correlation {gc:.3f}",
                "published" if res.T_optical_from_ct is not None else "rejected") if x)
        if "scr_inliers" in res.details:
            self._last_scr = f"{res.details['scr_inliers']} inliers ({res.details['scr_inlier_fraction']:.2f}), {res.details['scr_ms']:.0f} ms"
        if res.T_optical_from_ct is None:
            if res.error:
                self._error(res.error)
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
        if self.params["publish_overlay"] and self.overlay_pub.get_subscription_count() > 0:
            rgb = self.pipeline.overlay(res)
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
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._worker.join(timeout=5.0)
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
