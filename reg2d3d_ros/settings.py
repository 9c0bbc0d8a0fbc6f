"""Every setting of the node and the pipeline, defined once.

Each :class:`Setting` has a name, a default, a description, a unit and a range or a list of
choices, and says whether it may change while the node runs. Everything else is derived from
:data:`SETTINGS`:

- :class:`reg2d3d_ros.pipeline.PipelineConfig`: one field per pipeline setting, with its
  default (:func:`pipeline_fields`), checked by :func:`validate`;
- the node's ROS parameters and their descriptors (description, unit, range, read-only), and
  the check of a value given on the command line or set at run time (:meth:`Setting.check`);
- ``config/registration.yaml`` (``scripts/write_node_config.py``);
- the ``--set NAME=VALUE`` option of the benchmark.

This module imports nothing from the pipeline or the ROS layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .engines import DEVICES
from .engines.runtime import BACKENDS
from .errors import ConfigError
from .volume.ct import LABEL_SET_CHOICES

#: Update operators of registration and tracking (``tracker``).
TRACKERS = ("ppc", "ppc_l", "ppc_l_plus", "ppc_l_hybrid", "ppc_flow_plus")
#: Intensity-based stages of recovery and refinement (``recover``, ``refine``): off, a classic
#: similarity (gradient ascent then CMA-ES), the learned similarity, or the learned similarity then
#: gradient correlation from its result.
INTENSITY_STAGES = ("off", "ncc", "gc", "mncc", "learned", "learned_gc")
#: Degrees of freedom the ``track_dof`` setting accepts.
TRACK_DOFS = ("in_plane", "no_depth")
#: What PPC's moving image shows (``moving_image``).
MOVING_IMAGES = ("auto", "target", "roi")
#: What a frame's pixel values mean (``intensity``).
INTENSITIES = ("attenuation", "transmission")


@dataclass(frozen=True)
class Setting:
    """One setting.

    Attributes
    ----------
    name : str
        Parameter and field name.
    default : bool, int, float or str
        Default; its type is the setting's type.
    description : str
        What it does, for the parameter descriptor, the yaml and the docs.
    unit : str
        Unit ('' for none).
    range : tuple or None
        ``(lowest, highest)`` allowed number, inclusive.
    choices : tuple or None
        Allowed values of a text setting.
    runtime : bool
        May change while the node runs (else read-only: set when it starts).
    node_only : bool
        A setting of the ROS node only (topics, frames, periods), not of the pipeline.
    """

    name: str
    default: object
    description: str
    unit: str = ""
    range: tuple | None = None
    choices: tuple | None = None
    runtime: bool = False
    node_only: bool = False

    def expected(self) -> str:
        """What the setting takes, for messages (``a number in [0, 100] (unit: mm)``)."""
        unit = f" (unit: {self.unit})" if self.unit else ""
        if isinstance(self.default, bool):
            return "true or false"
        if isinstance(self.default, float):
            return (f"a number in [{self.range[0]:g}, {self.range[1]:g}]" if self.range else "a number") + unit
        if isinstance(self.default, int):
            return (f"an integer in [{self.range[0]}, {self.range[1]}]" if self.range else "an integer") + unit
        if self.choices is not None:
            return "one of " + ", ".join(self.choices)
        return "text"

    def check(self, value):
        """``value`` in the setting's type, or a :class:`ConfigError` naming the setting, its unit and range.

        An integer is taken for a floating-point setting (``search_range_mm:=20``) and for a text
        one (``target:=29``: a label id); an integral number for an integer setting.
        """
        wrong_type = ConfigError(f"parameter {self.name} must be {self.expected()}; got {_shown(value)}")
        if isinstance(self.default, bool):
            if not isinstance(value, bool):
                raise wrong_type
            return value
        if isinstance(self.default, (int, float)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise wrong_type
            if isinstance(self.default, float):
                value = float(value)
            elif isinstance(value, float):
                if not value.is_integer():
                    raise wrong_type
                value = int(value)
            if self.range is not None and not (math.isfinite(value) and self.range[0] <= value <= self.range[1]):
                raise ConfigError(f"parameter {self.name} must be {self.expected()}; got {value:g}")
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)  # an integer literal for a text setting: e.g. a label id
        if not isinstance(value, str):
            raise wrong_type
        if self.choices is not None and value not in self.choices:
            raise ConfigError(f"parameter {self.name} must be {self.expected()}; got {value!r}")
        return value


def _shown(value) -> str:
    """A value as the user wrote it, with its type where that was the problem."""
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, int):
        return f"{value} (an integer)"
    if isinstance(value, float):
        return f"{value:g} (a number)"
    if isinstance(value, str):
        return f"{value!r} (text)"
    return f"{value!r} (a {type(value).__name__})" if value is not None else "nothing (the parameter was unset)"


SETTINGS = (
    Setting('ct_path', '',
            'CT volume: NIfTI, NRRD or MHA file, or a DICOM series folder'),
    Setting('labels_path', '',
            'label map of the CT (e.g. TotalSegmentator) used to select the target'),
    Setting('label_table_path', '',
            "CSV naming the labels (columns structure,id); empty: TotalSegmentator's names, built in (label_set)"),
    Setting('label_set', 'auto',
            ('label ids of the built-in names (used when label_table_path is empty): totalseg_v2 (TotalSegmentator '
                'v2, task total, 117 classes) or totalseg_v1 (v1, 104 classes); auto: the version the label map shows '
                '(ids above 104, or where its vertebrae are), else totalseg_v2'),
            choices=LABEL_SET_CHOICES),
    Setting('resample_labels', False,
            ('a label map on another grid than the CT (size, spacing, origin, direction) is resampled onto the CT '
                'grid (nearest neighbour, said in the log) instead of being an error')),
    Setting('target', 'T8',
            ("structure to register: a TotalSegmentator name (vertebrae_L3), a vertebra's short name (L3) or a "
                'label id (29)')),
    Setting('intensity', 'attenuation',
            'pixel meaning: attenuation (bright = material) or transmission (bright = photons)',
            choices=INTENSITIES),
    Setting('tracker', 'ppc',
            ('update operator of registration and tracking: ppc (classic), ppc_l (learned correspondence weights), '
                'ppc_l_plus (learned at coarse levels, classic at full resolution), ppc_l_hybrid (learned weights '
                'inside the classic update), ppc_flow_plus (PPC Flow Attention at the coarsest level); the learned '
                'ones need ppcl.pt / ppcflow.pt in models_dir'),
            choices=TRACKERS),
    Setting('models_dir', '',
            ('model folder written by python -m reg2d3d_ros.prepare for this CT (scr.pt/scr.onnx: the SCR-PnP '
                'initialiser, used when no initial pose is given; ppcl.pt / ppcflow.pt: the learned update operators; '
                "similarity.pt: the learned similarity); every model file in it is checked at start-up; '' for none")),
    Setting('backend', 'auto',
            ('inference back-end of the networks (auto: TensorRT > PyTorch CUDA > ONNX Runtime CPU > PyTorch CPU; '
                'an unavailable one falls back with a warning)'),
            choices=BACKENDS),
    Setting('device', 'auto',
            'inference device (auto: cuda if available)',
            choices=DEVICES),
    Setting('recover', 'off',
            ('recovery stage when tracking is lost and SCR-PnP is rejected or unavailable (gc recommended: '
                'reports/intensity/report_recover.md): intensity-based registration (this similarity, gradient ascent '
                '+ CMA-ES) from the last good pose before PPC; learned: the learned similarity, similarity.pt in '
                'models_dir; learned_gc: learned, then gc; off: PPC from the last good pose'),
            choices=INTENSITY_STAGES),
    Setting('refine', 'off',
            ('refinement of every initial pose (SCR-PnP or initial_pose) by intensity-based registration (this '
                'similarity, gradient + CMA-ES) before PPC (learned: similarity.pt in models_dir)'),
            choices=INTENSITY_STAGES),
    Setting('moving_image', 'auto',
            ("what PPC's moving image (the DRR whose edges are matched) shows: target (the target's bone only), "
                'roi (all bone of the crop around it, neighbours included) or auto (roi for the classic tracker, '
                'target for the learned ones, which were trained with it; reports/ppc_search/report.md)'),
            choices=MOVING_IMAGES),
    Setting('search_range_mm', 15.0,
            ('global in-plane search of every PPC (re-)initialisation: image-plane shifts up to this far from the '
                "start (at the target's depth) and rotations about the principal ray, scored by gradient correlation; "
                'PPC runs from the start and the best candidates (reports/ppc_search/report.md); 0: off'),
            unit='mm', range=(0.0, 100.0)),
    Setting('local_first', True,
            ('every PPC (re-)initialisation first registers from the start alone and keeps that pose when it passes '
             'every check; only a refused one runs the in-plane search (search_range_mm): a start near the truth '
             'never loses to a look-alike (a neighbouring vertebra) the search finds; false: the search always runs')),
    Setting('polish', True,
            ('polish every PPC (re-)initialisation by gradient ascent on the gradient correlation of the moving '
                'image with the frame, every degree of freedom but depth (more precise than PPC alone, about 2-3 s '
                'more on 2 CPU cores; reports/ppc_polish/report.md); the acceptance checks look at the pose before '
                'the polish')),
    Setting('guard', True,
            ("judge every PPC (re-)initialisation's updates by the gradient correlation of the moving image with "
                'the frame (an update that lowers it is halved, reduced to its in-plane part or rejected) and pick '
                "the in-plane search's best start by it; about three times the PPC's time "
                '(reports/ppc_guard/report.md)')),
    Setting('intensity_budget_s', 2.0,
            'wall-time budget of the CMA-ES part of a recovery or refinement',
            unit='s', range=(0.0, 60.0)),
    Setting('ct_frame', 'ct',
            'TF child frame of the CT',
            node_only=True),
    Setting('image_topic', '/carm/image',
            'input frames (sensor_msgs/Image: mono8, mono16, 32FC1)',
            node_only=True),
    Setting('camera_info_topic', '/carm/camera_info',
            'input intrinsics (sensor_msgs/CameraInfo)',
            node_only=True),
    Setting('initial_pose_topic', '/registration/initial_pose',
            'optional pose guess (geometry_msgs/PoseStamped)',
            node_only=True),
    Setting('pose_topic', '/registration/pose',
            'output pose T_optical_from_ct (geometry_msgs/PoseStamped)',
            node_only=True),
    Setting('overlay_topic', '/registration/overlay',
            'output overlay (sensor_msgs/Image rgb8)',
            node_only=True),
    Setting('publish_overlay', True,
            'publish the overlay image for every registered frame',
            runtime=True, node_only=True),
    Setting('lost_inlier_fraction', 0.3,
            'tracking is judged lost below this inlier fraction of the contour correspondences',
            unit='fraction', range=(0.0, 1.0), runtime=True),
    Setting('lost_relative_fraction', 0.7,
            'tracking is judged lost when the inlier fraction drops below this fraction of its recent level',
            unit='fraction', range=(0.0, 1.0), runtime=True),
    Setting('lost_relative_gc', 0.6,
            ('tracking is judged lost when the gradient correlation of the moving image with the frame at the pose '
                'drops below this fraction of its recent level (a per-sequence baseline: the absolute level changes '
                'with contrast and dose); 0: off'),
            unit='fraction', range=(0.0, 1.0), runtime=True),
    Setting('max_peak_offset_mm', 3.0,
            ('every registration is compared with in-plane shifts of itself: when the frame matches the target '
                'best more than this far from the pose, nothing is published (lost / initialisation rejected); 0: off'),
            unit='mm', range=(0.0, 50.0), runtime=True),
    Setting('ambiguity_gc_ratio', 0.0,
            ('an initialisation whose start-near optimum is refused only because the frame matches the target '
                'better elsewhere, while its own gradient correlation is at least this fraction of that peak, is '
                'ambiguous (a look-alike, e.g. a neighbouring vertebra): the search result is not published when it '
                'moves to the other place; 0: off'),
            range=(0.0, 1.0), runtime=True),
    Setting('max_neighbour_gc_ratio', 0.85,
            ('every (re-)initialisation renders the whole CT at the registered pose and with the target moved onto '
                'the vertebra above and below; when such a shifted pose correlates with the frame at least this '
                'fraction as well as the registered pose, the registration locked onto a neighbouring vertebra '
                '(look-alike) and nothing is published (tuning frames: at most 0.74 at the truth, at least 1.38 at an '
                'exact lock, benchmarks/results/neighbour_check.md; 0.85 instead of 1 also refuses the partial locks '
                'of single-frame registrations from far starts: tuning 20 -> 11 wrong for 54 -> 51 correct); 0: off'),
            range=(0.0, 10.0), runtime=True),
    Setting('depth_search_mm', 40.0,
            ('an initialisation from SCR-PnP searches the depth along the ray through the target over +- this range '
                'with the whole field of view (the whole CT\'s DRR vs the frame, 4 mm samples at 128 px) and registers '
                'again at the profile\'s peak: SCR\'s error is mostly depth, which one view shows only as '
                'magnification (its depth errors reach 37 mm on the held-out first frames); 0: off'),
            unit='mm', range=(0.0, 100.0), runtime=True),
    Setting('min_depth_prominence', 0.03,
            ('the depth search moves the pose only when the profile\'s peak stands this much (relative) above its '
                'coarse samples 24 mm either side (tuning frames, benchmarks/results/depth_profile.md: at most 0.014 '
                'for the one flat profile, at least 0.05 for every search that ends within 2 mm of the truth)'),
            range=(0.0, 1.0), runtime=True),
    Setting('peak_correction', True,
            ('move a tracked pose onto the peak of that comparison when it lies 0.5 mm to max_peak_offset_mm '
                'beside it (in-plane, sub-pixel): removes the slow drift of the contour updates'),
            runtime=True),
    Setting('track_guard', True,
            ('keep the previous pose when the tracked pose correlates less with the frame than the previous pose '
                '(stops noise from walking a still view away)'),
            runtime=True),
    Setting('track_dof', 'no_depth',
            ('degrees of freedom of the per-frame tracking update: in_plane (rotation about the principal ray, '
                'image-plane translation) or no_depth (then also the out-of-plane rotations: follows a C-arm sweep)'),
            choices=TRACK_DOFS),
    Setting('motion_prediction', 0.7,
            ('each tracked frame starts from the previous pose moved on by this fraction of the last frame-to- '
                'frame motion (constant velocity, damped); 0: from the previous pose'),
            unit='fraction', range=(0.0, 1.0)),
    Setting('accept_inlier_fraction', 0.0,
            ('a (re-)initialisation with a lower inlier fraction publishes nothing (initialisation rejected: a '
                'wrong optimum usually fits fewer correspondences); 0: off'),
            unit='fraction', range=(0.0, 1.0), runtime=True),
    Setting('accept_gradient_correlation', 0.1,
            ('a (re-)initialisation whose moving image correlates less with the frame (gradient correlation at '
                'half resolution) publishes nothing (chosen with the roi moving image; reports/ppc_search/report.md); '
                '0: off'),
            range=(0.0, 1.0), runtime=True),
    Setting('min_correspondences', 30,
            'tracking is judged lost with fewer contour correspondences',
            unit='count', range=(0, 100000), runtime=True),
    Setting('diagnostics_period', 1.0,
            'period of /diagnostics messages',
            unit='s', range=(0.05, 60.0), node_only=True),
)

#: The settings by name.
BY_NAME = {s.name: s for s in SETTINGS}


def setting(name: str) -> Setting:
    """The :class:`Setting` called ``name`` (a :class:`ConfigError` naming the known ones otherwise)."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise ConfigError(f"unknown setting {name!r}; known: {', '.join(BY_NAME)}") from None


def pipeline_settings() -> tuple:
    """The settings that are fields of :class:`reg2d3d_ros.pipeline.PipelineConfig`, in order."""
    return tuple(s for s in SETTINGS if not s.node_only)


def validate(values: dict) -> dict:
    """``values`` (setting name -> value) checked by :meth:`Setting.check`; every problem in one :class:`ConfigError`."""
    out, problems = {}, []
    for name, value in values.items():
        try:
            out[name] = setting(name).check(value)
        except ConfigError as exc:
            problems.append(str(exc))
    if problems:
        raise ConfigError("; ".join(problems))
    return out
