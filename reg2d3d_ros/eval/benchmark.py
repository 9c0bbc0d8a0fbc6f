"""Generalisation benchmark: tracking through the node's pipeline on frames it was not tuned on.

One command, two tiers (``python -m reg2d3d_ros.eval.benchmark --tier quick|full``). A tier is a
list of :class:`SequenceSpec`: a vertebra, a view, a motion, a frame source and a start. Every
sequence is run through :class:`~reg2d3d_ros.pipeline.RegistrationPipeline` exactly as the node
runs it (the frames are encoded as they would arrive on ``/carm/image``; frame 0 gets the initial
pose on the initial-pose input; the node's defaults unless ``--set`` says otherwise) and each
frame's outcome is appended to ``results.jsonl`` as it comes (a finished sequence is skipped
when the command is run again, so an interrupted run resumes). ``report.md`` summarises the rows.

Frame sources (each with its own physics):

``randomised``
    the project's renderer with the domain randomisation of :mod:`reg2d3d_ros.sim.randomize`
    (one seeded draw of the physics, the display and the encoding per sequence);
``nominal``
    the project's simulator with the settings the node was first tuned on
    (:class:`~reg2d3d_ros.sim.XrayDegradation` defaults), for reference;
``diffdrr``
    DiffDRR 0.6.1, a renderer the project did not write, with its own HU-to-density physics
    (:mod:`reg2d3d_ros.eval.foreign`; needs the benchmark-only environment of
    ``scripts/setup_diffdrr_reference.sh``), Poisson noise at 5000 photons per pixel, mono16.

Splits: ``tuning`` sequences (T7, T9, T11) are the only ones any setting may be chosen on;
``heldout`` sequences (T6, T8, T10, T12) are for reporting. A published pose is *wrong* when its
mRPD exceeds :data:`WRONG_MRPD_MM`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, Reg2D3DError

#: A published pose with a larger mRPD is counted as wrong (mm).
WRONG_MRPD_MM = 2.0
#: Frames of a perturbed-start sequence that are not scored (the issue's "after the first 3 frames").
PERTURBED_GRACE_FRAMES = 3
#: mTRE of the perturbed start (mm).
PERTURBED_START_MM = 5.0
#: C-arm sweep rate (deg per frame; 24 deg over 60 frames).
SWEEP_DEG_PER_FRAME = 0.4
#: Table translation (mm per frame, CT frame: longitudinal and a little vertical).
TABLE_MM_PER_FRAME = (0.0, 0.15, 0.6)
#: Sudden jump: translation (mm) and rotation (deg) at the middle frame.
JUMP_MM, JUMP_DEG = 12.0, 3.0
#: Views: (LAO deg, cranial deg).
VIEWS = {"ap": (0.0, 0.0), "oblique": (40.0, 10.0), "lateral": (90.0, 0.0)}
MOTIONS = ("static", "smooth", "sweep", "table", "jump")
SOURCES = ("randomised", "nominal", "diffdrr")
TUNING_VERTEBRAE = ("T7", "T9", "T11")
HELDOUT_VERTEBRAE = ("T6", "T8", "T10", "T12")
#: Image size and pixel pitch of every benchmark frame (256x256, 1.2 mm, SDD 1020 mm).
SIZE = 256
#: Single-frame registrations (van de Kraats et al. 2005): starts per frame, per tier, and the
#: range of their initial mTRE (mm, spread evenly; :func:`reg2d3d_ros.eval.starts.random_starts`).
SINGLE_FRAME_STARTS = {"quick": 6, "full": 10}
SINGLE_FRAME_MAX_MTRE_MM = 30.0


@dataclass(frozen=True)
class SequenceSpec:
    """One benchmark sequence.

    Attributes
    ----------
    split : str
        ``tuning`` or ``heldout``.
    source : str
        Frame source (:data:`SOURCES`).
    vertebra, view, motion : str
        Target, C-arm view (:data:`VIEWS`), motion (:data:`MOTIONS`).
    frames : int
        Number of frames.
    start : str
        ``true`` (frame 0's ground truth on the initial-pose input) or ``perturbed``
        (:data:`PERTURBED_START_MM` mTRE off).
    seed : int
        Seed of the trajectory, the physics draw and the noise.
    """

    split: str
    source: str
    vertebra: str
    view: str
    motion: str
    frames: int
    start: str = "true"
    seed: int = 0

    @property
    def key(self) -> str:
        return f"{self.split}/{self.source}/{self.vertebra}/{self.view}/{self.motion}/{self.frames}/{self.start}/{self.seed}"


def _tier(split: str, vertebrae, sources, views, motions, frames: dict, starts=("true",), seed0: int = 0) -> list:
    out = []
    k = seed0
    for source in sources:
        for vert in vertebrae:
            for view in views:
                for motion in motions:
                    for start in starts:
                        out.append(SequenceSpec(split, source, vert, view, motion, frames[motion], start, k))
                        k += 1
    return out


def round_robin(specs: list) -> list:
    """The specs reordered so that every (source, motion, start) group gets its first sequences early.

    A long tier that is stopped part-way then still has rows for every group.
    """
    groups = {}
    for s in specs:
        groups.setdefault((s.source, s.motion, s.start), []).append(s)
    out = []
    for i in range(max(len(g) for g in groups.values())):
        out += [g[i] for g in groups.values() if i < len(g)]
    return out


def tier_specs(tier: str, split: str = "heldout") -> list:
    """The sequences of a tier (``quick`` or ``full``) on a split (``tuning`` or ``heldout``)."""
    if split not in ("tuning", "heldout"):
        raise ConfigError(f"split must be tuning or heldout, got {split!r}")
    verts = TUNING_VERTEBRAE if split == "tuning" else HELDOUT_VERTEBRAE
    seed0 = 1000 if split == "tuning" else 0
    if tier == "quick":
        # one vertebra per motion, rotating through views and vertebrae; few frames
        v = verts
        specs = [
            SequenceSpec(split, "randomised", v[0], "oblique", "static", 6, "true", seed0 + 1),
            SequenceSpec(split, "randomised", v[1], "ap", "smooth", 16, "true", seed0 + 2),
            SequenceSpec(split, "randomised", v[0], "lateral", "sweep", 16, "true", seed0 + 3),
            SequenceSpec(split, "randomised", v[2], "oblique", "jump", 12, "true", seed0 + 4),
            SequenceSpec(split, "randomised", v[1], "oblique", "smooth", 12, "perturbed", seed0 + 5),
            SequenceSpec(split, "diffdrr", v[0], "oblique", "static", 4, "true", seed0 + 6),
            SequenceSpec(split, "diffdrr", v[1], "ap", "smooth", 10, "true", seed0 + 7),
            SequenceSpec(split, "diffdrr", v[0], "lateral", "sweep", 10, "true", seed0 + 8),
        ]
        return specs
    if tier == "full":
        frames = {"static": 8, "smooth": 30, "sweep": 30, "table": 30, "jump": 20}
        specs = _tier(split, verts, ("randomised",), tuple(VIEWS), MOTIONS, frames, seed0=seed0)
        specs += _tier(split, verts, ("randomised",), ("oblique",), ("smooth", "sweep"), frames, starts=("perturbed",), seed0=seed0 + 300)
        dframes = {"static": 4, "smooth": 16, "sweep": 16, "table": 16, "jump": 12}
        specs += _tier(split, verts, ("diffdrr",), tuple(VIEWS), ("static", "smooth", "sweep", "jump"), dframes, seed0=seed0 + 600)
        return round_robin(specs)
    raise ConfigError(f"tier must be quick or full, got {tier!r}")


# -- sequences -------------------------------------------------------------------------------------
def sequence_poses(ct, spec: SequenceSpec, setup) -> torch.Tensor:
    """Ground-truth poses ``(F, 4, 4)`` float64 (mm) of a benchmark sequence."""
    from ..sim import structure_center, trajectory as traj
    from ..sim.trajectory import _about_center

    rng = np.random.default_rng(spec.seed)
    center = structure_center(ct, spec.vertebra)
    lao, cran = VIEWS[spec.view]
    lao += rng.uniform(-5, 5)
    cran += rng.uniform(-5, 5)
    iso = center + rng.uniform(-8, 8, size=3)
    F = spec.frames
    if spec.motion == "sweep":
        sign = 1.0 if rng.uniform() < 0.5 else -1.0
        span = SWEEP_DEG_PER_FRAME * (F - 1) * sign
        return traj.carm_rotation(iso, setup.sid_mm, F, lao, lao + span, cran, cran - 0.25 * span)
    from ..geometry.camera import carm_pose

    T0 = carm_pose(iso, setup.sid_mm, lao_deg=lao, cran_deg=cran)
    if spec.motion == "static":
        return traj.static(T0, F)
    if spec.motion == "smooth":
        return traj.smooth_patient_motion(T0, F, center, seed=spec.seed)
    if spec.motion == "table":
        xi = np.zeros((F, 6))
        xi[:, 3:] = np.arange(F)[:, None] * np.asarray(TABLE_MM_PER_FRAME)[None]
        return T0[None] @ _about_center(torch.from_numpy(xi), center)
    if spec.motion == "jump":
        return traj.sudden_jumps(T0, F, center, jump_frames=(F // 2,), jump_mm=JUMP_MM, jump_deg=JUMP_DEG, jitter_mm=0.1, seed=spec.seed)
    raise ConfigError(f"unknown motion {spec.motion!r}; choose one of {MOTIONS}")


def _cache_root() -> Path:
    from ..example import cache_dir

    return cache_dir() / "benchmark"


@dataclass(frozen=True)
class CTSource:
    """The CT a benchmark runs on (default: the built-in example, :func:`reg2d3d_ros.example.example_paths`).

    Attributes
    ----------
    ct, labels : str or Path
        CT and its label map.
    label_table : str or Path or None
        CSV naming the labels; None: TotalSegmentator's built-in names (``label_set``).
    label_set : str
        Built-in label names used without a table (``auto``, ``totalseg_v2``, ``totalseg_v1``).
    resample_labels : bool
        Resample a label map on another grid onto the CT's.
    """

    ct: str
    labels: str
    label_table: str | None = None
    label_set: str = "auto"
    resample_labels: bool = False


def ct_cache_root(source: CTSource) -> Path:
    """Cache of the rendered components of sequences of another CT than the example (keyed by its content)."""
    from ..provenance import content_sha256

    return _cache_root() / f"ct_{content_sha256(source.ct)[:16]}"


def sequence_frames(ct, ct_path: str, spec: SequenceSpec, setup, poses: torch.Tensor, renderer_cache: dict, cache_root: Path | None = None):
    """``(frames (F, H, W) encoded, encoding, intensity, meta)`` of a sequence from its source.

    ``cache_root`` holds the rendered components of ``randomised`` sequences (by sequence key;
    default: the example CT's benchmark cache, ``~/.cache/reg2d3d_ros/benchmark``): give another
    one for another CT or frame size.
    """
    intr = setup.intrinsics()
    if spec.source == "nominal":
        from ..sim import XrayDegradation, simulate_sequence, xray_renderer

        if "nominal" not in renderer_cache:
            renderer_cache["nominal"] = xray_renderer(ct)
        seq = simulate_sequence(renderer_cache["nominal"], intr, poses, XrayDegradation(), seed=spec.seed)
        return seq.images, seq.encoding, seq.intensity, {}
    if spec.source == "randomised":
        from ..sim import randomize as rz

        cache = (_cache_root() if cache_root is None else Path(cache_root)) / "components"
        cache.mkdir(parents=True, exist_ok=True)
        f = cache / (spec.key.replace("/", "_") + ".npy")
        if f.exists():
            comps = np.load(f)
        else:
            comps = rz.render_components(ct, intr, poses)
            tmp = f.with_name(f"{f.stem}.{os.getpid()}.tmp.npy")
            np.save(tmp, comps.astype(np.float32))
            os.replace(tmp, f)  # atomic: a concurrent run never reads a half-written file
        draw = rz.draw_domain(np.random.default_rng(spec.seed))
        seq = rz.simulate_randomised_sequence(comps, poses, intr, draw, seed=spec.seed)
        return seq.images, seq.encoding, seq.intensity, {"domain": seq.meta.get("domain")}
    if spec.source == "diffdrr":
        from .foreign import foreign_frame, render_foreign

        images = render_foreign(ct_path, poses, intr)
        return foreign_frame(images, seed=spec.seed), "mono16", "attenuation", {"renderer": "diffdrr"}
    raise ConfigError(f"unknown source {spec.source!r}; choose one of {SOURCES}")


# -- running ---------------------------------------------------------------------------------------
def make_pipeline(ct_path: str, labels_path: str, label_table: str, target: str, overrides: dict, intensity: str):
    """A loaded :class:`RegistrationPipeline` for one target, node defaults plus ``overrides``."""
    from ..pipeline import PipelineConfig, RegistrationPipeline

    cfg = PipelineConfig(ct_path=ct_path, labels_path=labels_path, label_table_path=label_table, target=target, intensity=intensity)
    cfg = replace(cfg, **overrides)
    pipe = RegistrationPipeline(cfg)
    pipe.load()
    return pipe


def perturbed_start(T_gt: torch.Tensor, pts: torch.Tensor, seed: int) -> torch.Tensor:
    """A start :data:`PERTURBED_START_MM` mTRE from ``T_gt`` (random rotation up to 3 deg)."""
    from .starts import random_starts

    starts, _ = random_starts(T_gt, pts, 1, max_mtre_mm=PERTURBED_START_MM + 0.05, min_mtre_mm=PERTURBED_START_MM - 0.05, seed=seed,
                              max_rotation_deg=3.0)
    return starts[0]


def run_sequence(pipe, spec: SequenceSpec, frames: np.ndarray, encoding: str, poses: torch.Tensor, pts: torch.Tensor, setup) -> list:
    """Process a sequence frame by frame; one row per frame."""
    from ..images import encode_image
    from .metrics import mrpd, mtre

    pipe.reset()
    ci = setup.intrinsics().to_camera_info()
    pipe.set_camera_info(ci["k"], ci["width"], ci["height"])
    T_start = poses[0] if spec.start == "true" else perturbed_start(poses[0], pts, spec.seed)
    pipe.set_initial_pose(T_start)
    rows = []
    for f in range(len(frames)):
        e = encode_image(frames[f], encoding)
        t0 = time.perf_counter()
        r = pipe.process(e["encoding"], e["height"], e["width"], e["step"], e["data"])
        dt = time.perf_counter() - t0
        row = {"key": spec.key, "frame": f, "answered": r.T_optical_from_ct is not None, "state": r.state,
               "mode": r.details.get("mode", ""), "latency_ms": round(1000 * dt, 1), "error": r.error[:160],
               "confidence": round(float(r.confidence), 4)}
        if r.T_optical_from_ct is not None:
            row["mrpd_mm"] = round(float(mrpd(r.T_optical_from_ct, poses[f], pts)), 3)
            row["mtre_mm"] = round(float(mtre(r.T_optical_from_ct, poses[f], pts)), 3)
        if r.T_registered is not None and r.T_optical_from_ct is None:  # what the acceptance checks refused
            row["refused_mrpd_mm"] = round(float(mrpd(r.T_registered, poses[f], pts)), 3)
        for k in ("gradient_correlation", "peak", "search_candidate", "search", "reference_inlier_fraction", "neighbour_check"):
            if k in r.details:
                row[k] = r.details[k]
        _local_peak(row, r.details, poses[f], pts)
        rows.append(row)
    return rows


def _local_peak(row: dict, details: dict, T_gt: torch.Tensor, pts: torch.Tensor) -> None:
    """Copy the refused start-near optimum's peak check into ``row`` with its mRPD (what ``ambiguity_gc_ratio`` is tuned on)."""
    from .metrics import mrpd

    lp = details.get("local_peak")
    if lp:
        T = torch.tensor(lp["T"], dtype=torch.float64)
        row["local_peak"] = {k: lp[k] for k in ("gc", "peak_gc", "offset_mm", "search_moved_mm") if k in lp} | \
            {"mrpd_mm": round(float(mrpd(T, T_gt, pts)), 3)}


def read_jsonl(path: Path) -> list:
    """The rows of a results file (``[]`` when it does not exist; a line cut by an interruption is skipped)."""
    rows = []
    for line in (path.read_text().splitlines() if path.exists() else []):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def done_keys(results: Path) -> set:
    """Keys of the sequences whose every frame is in a results file."""
    return {row["key"] for row in read_jsonl(results) if row.get("kind") == "sequence"}


def read_rows(results: Path) -> tuple:
    """``(sequence rows, frame rows)`` of a results file (none when it does not exist: a run of single frames only)."""
    seqs, frames = [], []
    for row in read_jsonl(results):
        (seqs if row.get("kind") == "sequence" else frames).append(row)
    keys = {s["key"] for s in seqs}
    return seqs, [r for r in frames if r["key"] in keys]


def _open_ct(source: "CTSource | None" = None) -> tuple:
    """``(paths, ct, cache_root, setup)`` of a benchmark CT: ``source``, or the built-in example (``cache_root`` None)."""
    from ..example import example_paths
    from ..sim import CArmSetup
    from ..volume import load_ct

    if source is None:
        ex = example_paths()
        paths, cache_root = CTSource(str(ex.ct), str(ex.labels), str(ex.label_table)), None
    else:
        paths, cache_root = source, ct_cache_root(source)
    ct = load_ct(paths.ct, labels_path=paths.labels, label_table=paths.label_table, label_set=paths.label_set,
                 resample_labels=paths.resample_labels)
    return paths, ct, cache_root, CArmSetup().at_size(SIZE)


def _pipeline_for(pipes: dict, paths: "CTSource", vertebra: str, overrides: dict, intensity: str):
    """The loaded pipeline of ``vertebra`` (made once per run, kept in ``pipes``), set to what this source's pixel values mean."""
    if vertebra not in pipes:
        labels_settings = {"label_set": paths.label_set, "resample_labels": paths.resample_labels}
        pipes[vertebra] = make_pipeline(str(paths.ct), str(paths.labels), str(paths.label_table or ""), vertebra,
                                        {**labels_settings, **overrides}, intensity)
    pipe = pipes[vertebra]
    pipe.config = replace(pipe.config, intensity=intensity)  # as the node's intensity parameter says
    return pipe


def _target_points(ct, vertebra: str) -> torch.Tensor:
    """``(N, 3)`` float64 points of the target (CT frame, mm) the metrics are computed on."""
    from ..volume import resolve_label

    return torch.from_numpy(ct.label_points_ct_mm([resolve_label(vertebra, ct.label_names)], max_points=1000, seed=0))


def static_first_frames(splits=("tuning", "heldout"), tier: str = "full"):
    """Frame 0 of the single-frame specs (the static sequences) of ``splits``, for offline studies of the checks.

    Returns ``(ct, intrinsics, frames)``; ``frames`` yields ``(split, spec, T_gt, image_att)``:
    the true ``(4, 4)`` float64 pose (mm) and the ``(H, W)`` float32 frame as attenuation.
    """
    from ..images import to_attenuation

    paths, ct, cache_root, setup = _open_ct()

    def frames():
        renderers: dict = {}
        for split in splits:
            for spec in single_frame_specs(tier, split):
                poses = sequence_poses(ct, spec, setup)
                images, _, intensity, _ = sequence_frames(ct, str(paths.ct), spec, setup, poses, renderers, cache_root=cache_root)
                yield split, spec, poses[0], to_attenuation(images[0].astype(np.float32), intensity)

    return ct, setup.intrinsics(), frames()


def render_only(specs: list, progress: bool = True) -> int:
    """Render (and cache) the frames of ``specs`` without running the pipeline; returns the number rendered.

    The frames do not depend on the pipeline's settings, so a long tier's rendering can run ahead
    (e.g. in the background while the pipeline is being changed).
    """
    paths, ct, cache_root, setup = _open_ct()
    renderers: dict = {}
    t0 = time.perf_counter()
    for i, spec in enumerate(specs):
        poses = sequence_poses(ct, spec, setup)
        sequence_frames(ct, str(paths.ct), spec, setup, poses, renderers, cache_root=cache_root)
        if progress:
            print(f"[{i + 1}/{len(specs)}] rendered {spec.key} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return len(specs)


def run(specs: list, out: Path, overrides: dict | None = None, progress: bool = True, source: CTSource | None = None) -> Path:
    """Run the sequences not yet in ``out/results.jsonl``; returns the results file.

    ``source``: another CT than the built-in example (its rendered components are cached by
    :func:`ct_cache_root`); the specs' vertebrae must be labelled in it.
    """
    overrides = dict(overrides or {})
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    done = done_keys(results)
    todo = [s for s in specs if s.key not in done]
    if progress:
        print(f"benchmark: {len(specs)} sequences, {len(specs) - len(todo)} already in {results}, {len(todo)} to run", flush=True)
    if not todo:
        return results
    paths, ct, cache_root, setup = _open_ct(source)
    pipes, renderers = {}, {}
    t_all = time.perf_counter()
    for i, spec in enumerate(todo):
        t0 = time.perf_counter()
        poses = sequence_poses(ct, spec, setup)
        frames, encoding, intensity, meta = sequence_frames(ct, str(paths.ct), spec, setup, poses, renderers, cache_root=cache_root)
        pipe = _pipeline_for(pipes, paths, spec.vertebra, overrides, intensity)
        pts = _target_points(ct, spec.vertebra)
        t1 = time.perf_counter()
        rows = run_sequence(pipe, spec, frames, encoding, poses, pts, setup)
        seq_row = {"kind": "sequence", "key": spec.key, **asdict(spec), "encoding": encoding, "intensity": intensity,
                   "overrides": overrides, "config": {k: v for k, v in asdict(pipe.config).items() if not k.endswith("_path")}, "render_s": round(t1 - t0, 1), "run_s": round(time.perf_counter() - t1, 1), **meta}
        with open(results, "a") as fh:
            for r in rows:
                fh.write(json.dumps(r) + "\n")
            fh.write(json.dumps(seq_row) + "\n")
        if progress:
            s = score_sequence(seq_row, rows)
            print(f"[{i + 1}/{len(todo)}] {spec.key}: answered {s['answered']}/{s['scored']}, median mRPD {s['mrpd_median_mm']:.2f} mm, "
                  f"mTRE {s['mtre_median_mm']:.1f} mm, wrong {s['wrong']}, {s['latency_ms_median']:.0f} ms/frame "
                  f"({time.perf_counter() - t_all:.0f} s)", flush=True)
    return results


# -- single frames (van de Kraats) ---------------------------------------------------------------
def single_frame_specs(tier: str, split: str = "heldout") -> list:
    """The frames of the single-frame row: frame 0 of the tier's static sequences (every source and view)."""
    return [s for s in tier_specs(tier, split) if s.motion == "static"]


def run_single_frame(specs: list, out: Path, n_starts: int, overrides: dict | None = None, progress: bool = True) -> Path:
    """Register frame 0 of each spec from ``n_starts`` starts 0-30 mm off, through the pipeline; returns the results file.

    Each start is published on the initial-pose input of a reset pipeline and the frame is
    processed as the node does (the local optimum first, the in-plane search when it is refused,
    the acceptance checks). One row per start in ``out/single_frame.jsonl`` (appended as it goes;
    a frame whose every start is there is skipped when run again).
    """
    from ..images import encode_image
    from .metrics import mrpd, mtre
    from .starts import random_starts

    overrides = dict(overrides or {})
    out.mkdir(parents=True, exist_ok=True)
    results = out / "single_frame.jsonl"
    done = {}
    for row in read_jsonl(results):
        done[row["key"]] = done.get(row["key"], 0) + 1
    todo = [s for s in specs if done.get(s.key, 0) < n_starts]
    if progress:
        print(f"single frame: {len(specs)} frames x {n_starts} starts, {len(specs) - len(todo)} frames already in {results}", flush=True)
    if not todo:
        return results
    paths, ct, cache_root, setup = _open_ct()
    ci = setup.intrinsics().to_camera_info()
    pipes, renderers = {}, {}
    for spec in todo:
        poses = sequence_poses(ct, spec, setup)
        frames, encoding, intensity, _ = sequence_frames(ct, str(paths.ct), spec, setup, poses, renderers, cache_root=cache_root)
        pipe = _pipeline_for(pipes, paths, spec.vertebra, overrides, intensity)
        pts = _target_points(ct, spec.vertebra)
        starts, _ = random_starts(poses[0], pts, n_starts, max_mtre_mm=SINGLE_FRAME_MAX_MTRE_MM, seed=spec.seed)
        e = encode_image(frames[0], encoding)
        for k in range(done.get(spec.key, 0), n_starts):
            pipe.reset()
            pipe.set_camera_info(ci["k"], ci["width"], ci["height"])
            pipe.set_initial_pose(starts[k])
            t0 = time.perf_counter()
            r = pipe.process(e["encoding"], e["height"], e["width"], e["step"], e["data"])
            row = {"key": spec.key, "source": spec.source, "view": spec.view, "vertebra": spec.vertebra, "start": k,
                   "initial_mtre_mm": round(float(mtre(starts[k], poses[0], pts)), 3), "answered": r.T_optical_from_ct is not None,
                   "seconds": round(time.perf_counter() - t0, 2), "reason": r.reason, "search": r.details.get("search", "")}
            if r.T_registered is not None:
                row["mrpd_mm"] = round(float(mrpd(r.T_registered, poses[0], pts)), 3)
            _local_peak(row, r.details, poses[0], pts)
            if "neighbour_check" in r.details:
                row["neighbour_check"] = r.details["neighbour_check"]
            with open(results, "a") as fh:
                fh.write(json.dumps(row) + "\n")
        if progress:
            print(f"single frame {spec.key}: {n_starts} starts done", flush=True)
    return results


def summarise_single_frame(results: Path) -> list:
    """Per source: the seed's Table 1 (SR, CR, mRPD of the successes) plus what the node published.

    Success: the registered pose (published or not) within 2 mm mRPD. Answered: a pose was
    published; wrong: published with mRPD > :data:`WRONG_MRPD_MM`.
    """
    from .metrics import capture_range

    rows = read_jsonl(results)
    out = []
    for source in sorted({r["source"] for r in rows}):
        rs = [r for r in rows if r["source"] == source]
        init = np.array([r["initial_mtre_mm"] for r in rs])
        err = np.array([r.get("mrpd_mm", float("inf")) for r in rs])
        ok = err < WRONG_MRPD_MM
        ans = np.array([r["answered"] for r in rs])
        out.append({"source": source, "frames": len({r["key"] for r in rs}), "registrations": len(rs),
                    "sr_pct": 100.0 * ok.mean(), "cr_mm": capture_range(init, ok, bin_mm=5.0, required=0.95, max_mm=SINGLE_FRAME_MAX_MTRE_MM),
                    "mrpd_mean_mm": float(err[ok].mean()) if ok.any() else float("nan"),
                    "mrpd_std_mm": float(err[ok].std()) if ok.any() else float("nan"),
                    "answered_pct": 100.0 * ans.mean(), "wrong": int((ans & ~ok).sum()),
                    "seconds_median": float(np.median([r["seconds"] for r in rs]))})
    return out


# -- first frame without a pose (SCR-PnP) -------------------------------------------------------
#: An SCR pose farther than this from the truth (mTRE, mm) is a gross failure (the seed's GFR).
GROSS_MTRE_MM = 10.0


def first_frame_specs(tier: str, split: str = "heldout") -> list:
    """The frames of the SCR row: frame 0 of every sequence of the tier, one per (source, vertebra, view, seed)."""
    seen, out = set(), []
    for s in tier_specs(tier, split):
        k = (s.source, s.vertebra, s.view, s.seed)
        if k not in seen:
            seen.add(k)
            out.append(s)
    return out


class _RecordingSCR:
    """An SCR initialiser that keeps its last result (the benchmark scores SCR's own pose too)."""

    def __init__(self, scr):
        self.scr, self.last = scr, None

    def initialise(self, image, K):
        self.last = self.scr.initialise(image, K)
        return self.last


def run_first_frame(specs: list, out: Path, models_dir: Path, overrides: dict | None = None, progress: bool = True) -> Path:
    """Frame 0 of each spec with no initial pose: SCR-PnP, then the pipeline as the node runs it; returns the results file.

    The SCR model of ``models_dir`` (made for one target of this CT; its scene is the whole
    spine, so its pose serves every vertebra) runs inside the pipeline of the frame's vertebra,
    which has no pose, as in the node: a rejected SCR pose publishes nothing, an accepted one is
    refined, registered, its depth searched and checked. One row per frame
    in ``out/first_frame.jsonl`` (appended as it goes; frames already there are skipped).
    """
    from ..images import encode_image
    from ..pipeline import load_scr
    from .metrics import mrpd, mtre

    overrides = dict(overrides or {})
    out.mkdir(parents=True, exist_ok=True)
    results = out / "first_frame.jsonl"
    done = {row["key"] for row in read_jsonl(results)}
    todo = [s for s in specs if s.key not in done]
    if progress:
        print(f"first frame: {len(specs)} frames, {len(specs) - len(todo)} already in {results}", flush=True)
    if not todo:
        return results
    scr = load_scr(str(models_dir), "onnxruntime", "cpu")
    if scr is None:
        raise ConfigError(f"no SCR model in {models_dir} (scr.pt): make one with python -m reg2d3d_ros.prepare")
    recording = _RecordingSCR(scr)
    paths, ct, cache_root, setup = _open_ct()
    intr = setup.intrinsics()
    ci = intr.to_camera_info()
    pipes, renderers = {}, {}
    for spec in todo:
        poses = sequence_poses(ct, spec, setup)  # the whole sequence: its frames are cached by the sequence runs
        frames, encoding, intensity, _ = sequence_frames(ct, str(paths.ct), spec, setup, poses, renderers, cache_root=cache_root)
        pipe = _pipeline_for(pipes, paths, spec.vertebra, overrides, intensity)
        pipe.scr = recording  # the pipeline runs SCR-PnP itself when it has no pose, as in the node
        pts = _target_points(ct, spec.vertebra)
        e = encode_image(frames[0], encoding)
        pipe.reset()
        pipe.set_camera_info(ci["k"], ci["width"], ci["height"])
        recording.last = None
        t0 = time.perf_counter()
        res = pipe.process(e["encoding"], e["height"], e["width"], e["step"], e["data"])
        r = recording.last
        if r is None:
            raise RuntimeError(f"{spec.key}: the pipeline did not run SCR-PnP ({res.reason}: {res.error})")
        row = {"key": spec.key, "source": spec.source, "view": spec.view, "vertebra": spec.vertebra, "scr_accepted": bool(r.accepted),
               "scr_ms": round(1000 * (r.network_seconds + r.pnp_seconds), 1), "scr_inliers": int(r.pnp.n_inliers),
               "scr_inlier_fraction": round(float(r.confidence), 3), "scr_why": r.why}
        if r.T_optical_from_ct is not None:
            T = torch.as_tensor(r.T_optical_from_ct, dtype=torch.float64)
            row["scr_mtre_mm"] = round(float(mtre(T, poses[0], pts)), 3)
            row["scr_mrpd_mm"] = round(float(mrpd(T, poses[0], pts)), 3)
        row.update(answered=res.T_optical_from_ct is not None, reason=res.reason, search=res.details.get("search", ""))
        if "depth_search" in res.details:
            row["depth_search"] = res.details["depth_search"]
        if res.T_registered is not None:
            row["mrpd_mm"] = round(float(mrpd(res.T_registered, poses[0], pts)), 3)
            row["mtre_mm"] = round(float(mtre(res.T_registered, poses[0], pts)), 3)
        row["seconds"] = round(time.perf_counter() - t0, 2)
        with open(results, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        if progress:
            print(f"first frame {spec.key}: SCR mTRE {row.get('scr_mtre_mm', float('inf')):.1f} mm "
                  f"{'accepted' if r.accepted else 'rejected'}; published {row['answered']} mRPD {row.get('mrpd_mm', float('nan')):.2f} mm "
                  f"({row['seconds']:.1f} s)", flush=True)
    return results


def summarise_first_frame(results: Path) -> list:
    """Per source: SCR-PnP mTRE percentiles and GFR, what the acceptance lets through, what the node publishes."""
    from .metrics import percentiles

    rows = read_jsonl(results)
    out = []
    for source in sorted({r["source"] for r in rows}):
        rs = [r for r in rows if r["source"] == source]
        e = percentiles([r.get("scr_mtre_mm", float("inf")) for r in rs])
        acc = np.array([r["scr_accepted"] for r in rs])
        gross = np.array([r.get("scr_mtre_mm", float("inf")) for r in rs]) > GROSS_MTRE_MM
        ans = np.array([r["answered"] for r in rs])
        pub_rpd = np.array([r.get("mrpd_mm", float("inf")) for r in rs])
        pub_tre = np.array([r.get("mtre_mm", float("inf")) for r in rs])
        out.append({"source": source, "frames": len(rs), **{f"scr_mtre_{q}_mm": v for q, v in e.items()},
                    "scr_mrpd_median_mm": float(np.median([r.get("scr_mrpd_mm", float("inf")) for r in rs])),
                    "gfr_pct": 100.0 * gross.mean(), "accepted_pct": 100.0 * acc.mean(), "gross_accepted": int((gross & acc).sum()),
                    "published_pct": 100.0 * ans.mean(), "published_wrong": int((ans & (pub_rpd > WRONG_MRPD_MM)).sum()),
                    "published_gross": int((ans & (pub_tre > GROSS_MTRE_MM)).sum()),
                    "published_mtre_median_mm": float(np.median(pub_tre[ans])) if ans.any() else float("nan"),
                    "published_mrpd_median_mm": float(np.median(pub_rpd[ans])) if ans.any() else float("nan"),
                    "scr_ms_median": float(np.median([r["scr_ms"] for r in rs])),
                    "first_pose_s_median": float(np.median([r["seconds"] for r in rs if r["answered"]])) if ans.any() else float("nan")})
    return out


# -- scoring ---------------------------------------------------------------------------------------
def score_sequence(seq: dict, rows: list) -> dict:
    """Per-sequence numbers: answered, median mRPD / mTRE of the answered frames, wrong poses, latency; jump metrics."""
    rows = sorted(rows, key=lambda r: r["frame"])
    first = PERTURBED_GRACE_FRAMES if seq["start"] == "perturbed" else 0
    scored = rows[first:]
    ans = [r for r in scored if r["answered"]]
    e = np.array([r["mrpd_mm"] for r in ans]) if ans else np.zeros(0)
    t = np.array([r["mtre_mm"] for r in ans]) if ans else np.zeros(0)
    track_ms = [r["latency_ms"] for r in rows if r["mode"] == "track"]
    init_s = [r["latency_ms"] / 1000 for r in rows if r["mode"].startswith("initialise")]
    out = {
        "scored": len(scored),
        "answered": len(ans),
        "wrong": int((e > WRONG_MRPD_MM).sum()),
        "mrpd_median_mm": float(np.median(e)) if len(e) else float("nan"),
        "mtre_median_mm": float(np.median(t)) if len(t) else float("nan"),
        "latency_ms_median": float(np.median([r["latency_ms"] for r in rows])) if rows else float("nan"),
        "track_ms_median": float(np.median(track_ms)) if track_ms else float("nan"),
        "init_s_median": float(np.median(init_s)) if init_s else float("nan"),
    }
    if seq["motion"] == "jump":
        j = seq["frames"] // 2
        jr = rows[j] if j < len(rows) else None
        out["jump_published_wrong"] = bool(jr and jr["answered"] and jr["mrpd_mm"] > WRONG_MRPD_MM)
        back = [r["frame"] - j for r in rows[j:] if r["answered"] and r["mrpd_mm"] <= WRONG_MRPD_MM]
        out["jump_frames_to_recover"] = back[0] if back else None
    return out


def summarise(results: Path) -> list:
    """One summary row per (split, source, motion, start) group."""
    seqs, frames = read_rows(results)
    by_key = {}
    for r in frames:
        by_key.setdefault(r["key"], []).append(r)
    groups = {}
    for s in seqs:
        sc = score_sequence(s, by_key.get(s["key"], []))
        groups.setdefault((s["split"], s["source"], s["motion"], s["start"]), []).append((s, sc, by_key.get(s["key"], [])))
    out = []
    for (split, source, motion, start), items in sorted(groups.items()):
        first = PERTURBED_GRACE_FRAMES if start == "perturbed" else 0
        allrows = [r for _, _, rows in items for r in sorted(rows, key=lambda r: r["frame"])[first:]]
        ans = [r for r in allrows if r["answered"]]
        e = np.array([r["mrpd_mm"] for r in ans]) if ans else np.zeros(0)
        t = np.array([r["mtre_mm"] for r in ans]) if ans else np.zeros(0)
        track = [r["latency_ms"] for _, _, rows in items for r in rows if r["mode"] == "track"]
        init = [r["latency_ms"] / 1000 for _, _, rows in items for r in rows if r["mode"].startswith("initialise")]
        row = {"split": split, "source": source, "motion": motion, "start": start, "sequences": len(items), "frames": len(allrows),
               "answered_pct": 100.0 * len(ans) / max(len(allrows), 1),
               "mrpd_median_mm": float(np.median(e)) if len(e) else float("nan"),
               "mtre_median_mm": float(np.median(t)) if len(t) else float("nan"),
               "wrong": int((e > WRONG_MRPD_MM).sum()),
               "track_ms_median": float(np.median(track)) if track else float("nan"),
               "init_s_median": float(np.median(init)) if init else float("nan")}
        if motion == "jump":
            row["jump_published_wrong"] = sum(bool(sc.get("jump_published_wrong")) for _, sc, _ in items)
            rec = [sc.get("jump_frames_to_recover") for _, sc, _ in items]
            row["jump_recovered_within_5"] = sum(1 for x in rec if x is not None and x <= 5)
        out.append(row)
    return out


def _f(x, fmt="{:.2f}") -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)


def write_report(out: Path, tier: str, meta: dict) -> Path:
    """``out/report.md`` and ``out/summary.json`` from ``out/results.jsonl``."""
    results = out / "results.jsonl"
    rows = summarise(results)
    (out / "summary.json").write_text(json.dumps({"tier": tier, "meta": meta, "groups": rows,
                                                  "single_frame": summarise_single_frame(out / "single_frame.jsonl"),
                                                  "first_frame": summarise_first_frame(out / "first_frame.jsonl")}, indent=1))
    seqs, frames = read_rows(results)
    by_key = {}
    for r in frames:
        by_key.setdefault(r["key"], []).append(r)
    lines = [f"# Generalisation benchmark ({tier} tier; simulated frames)", "",
             f"Command: `{meta.get('command', '')}`. Settings: {json.dumps(meta.get('overrides', {}))}. "
             f"256x256 at 1.2 mm, SDD 1020 mm; wrong = published with mRPD > {WRONG_MRPD_MM} mm; "
             f"perturbed starts ({PERTURBED_START_MM:.0f} mm) are scored after the first {PERTURBED_GRACE_FRAMES} frames.", "",
             "| split | source | motion | start | seqs | frames | answered % | median mRPD mm | median mTRE mm | wrong | track ms (median) | init s (median) | jump: wrong / back in 5 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        jump = f"{r['jump_published_wrong']} / {r['jump_recovered_within_5']}" if r["motion"] == "jump" else ""
        lines.append(f"| {r['split']} | {r['source']} | {r['motion']} | {r['start']} | {r['sequences']} | {r['frames']} | "
                     f"{r['answered_pct']:.0f} | {_f(r['mrpd_median_mm'])} | {_f(r['mtre_median_mm'], '{:.1f}')} | {r['wrong']} | "
                     f"{_f(r['track_ms_median'], '{:.0f}')} | {_f(r['init_s_median'], '{:.1f}')} | {jump} |")
    single = summarise_single_frame(out / "single_frame.jsonl")
    if single:
        lines += ["", f"## Single frame (van de Kraats: starts 0-{SINGLE_FRAME_MAX_MTRE_MM:.0f} mm mTRE, through the pipeline)", "",
                  "Success: the registered pose within 2 mm mRPD; CR: largest initial mTRE below which every 5 mm bin succeeds >= 95 %; "
                  "answered: published; wrong: published and not a success.", "",
                  "| source | frames | registrations | SR % | CR mm | mRPD of successes mm | answered % | wrong | time s (median) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in single:
            lines.append(f"| {r['source']} | {r['frames']} | {r['registrations']} | {r['sr_pct']:.0f} | {r['cr_mm']:.0f} | "
                         f"{_f(r['mrpd_mean_mm'])} +- {_f(r['mrpd_std_mm'])} | {r['answered_pct']:.0f} | {r['wrong']} | {r['seconds_median']:.1f} |")
    first = summarise_first_frame(out / "first_frame.jsonl")
    if first:
        lines += ["", f"## First frame without a pose (SCR-PnP, model {meta.get('models_dir', '')})", "",
                  f"Frame 0 of each sequence; gross failure: SCR mTRE > {GROSS_MTRE_MM:.0f} mm or no pose; the pipeline runs SCR-PnP "
                  f"itself as the node does (accepted poses: PPC, the depth search, the checks); published wrong: mRPD > {WRONG_MRPD_MM} mm, published gross: mTRE > {GROSS_MTRE_MM:.0f} mm.", "",
                  "| source | frames | SCR mTRE p25 / p50 / p95 mm | SCR mRPD p50 mm | GFR % | SCR accepted % | gross accepted | "
                  "published % | published wrong | published gross | published mTRE / mRPD p50 mm | SCR ms | first pose s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in first:
            lines.append(f"| {r['source']} | {r['frames']} | {_f(r['scr_mtre_p25_mm'], '{:.1f}')} / {_f(r['scr_mtre_p50_mm'], '{:.1f}')} / "
                         f"{_f(r['scr_mtre_p95_mm'], '{:.1f}')} | {_f(r['scr_mrpd_median_mm'])} | {r['gfr_pct']:.0f} | {r['accepted_pct']:.0f} | "
                         f"{r['gross_accepted']} | {r['published_pct']:.0f} | {r['published_wrong']} | {r['published_gross']} | "
                         f"{_f(r['published_mtre_median_mm'], '{:.1f}')} / {_f(r['published_mrpd_median_mm'])} | {r['scr_ms_median']:.0f} | "
                         f"{_f(r['first_pose_s_median'], '{:.1f}')} |")
    lines += ["", "## Sequences", "", "| sequence | encoding / intensity | answered | median mRPD | median mTRE | wrong | first error |", "|---|---|---|---|---|---|---|"]
    for s in seqs:
        rws = by_key.get(s["key"], [])
        sc = score_sequence(s, rws)
        err = next((r["error"] for r in sorted(rws, key=lambda r: r["frame"]) if r["error"]), "")
        lines.append(f"| {s['key']} | {s['encoding']} / {s['intensity']} | {sc['answered']}/{sc['scored']} | {_f(sc['mrpd_median_mm'])} | "
                     f"{_f(sc['mtre_median_mm'], '{:.1f}')} | {sc['wrong']} | {err[:90]} |")
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _parse_set(items) -> dict:
    """``NAME=VALUE`` items as pipeline settings (:mod:`reg2d3d_ros.settings`), each checked against its type and range."""
    from ..settings import setting

    out = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set takes NAME=VALUE, got {item!r}")
        name, text = item.split("=", 1)
        spec = setting(name)
        if spec.node_only:
            raise ConfigError(f"--set: {name} is a setting of the ROS node, not of the pipeline")
        default = spec.default
        try:
            value = (text.lower() in ("1", "true", "yes", "on")) if isinstance(default, bool) else type(default)(text)
        except ValueError:
            raise ConfigError(f"--set {name}: cannot read {text!r} as {type(default).__name__}") from None
        out[name] = spec.check(value)
    return out


def _parse_shard(text: str):
    """``(i, n)`` of ``--shard I/N`` (None when empty)."""
    if not text:
        return None
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard takes I/N (e.g. 0/2), got {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise ConfigError(f"--shard {text}: need N >= 1 and 0 <= I < N")
    return i, n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m reg2d3d_ros.eval.benchmark", description=__doc__.split("\n\n")[0])
    p.add_argument("--tier", choices=("quick", "full"), default="quick", help="quick: under 5 min on 2 cores once the foreign frames are cached; full: background")
    p.add_argument("--split", choices=("heldout", "tuning"), default="heldout", help="tuning sequences are the only ones settings may be chosen on")
    p.add_argument("--sources", default=",".join(s for s in SOURCES if s != "nominal"), help="comma-separated frame sources")
    p.add_argument("--out", type=Path, default=None, help="output folder (default reports/benchmark/<tier>_<split>)")
    p.add_argument("--set", action="append", metavar="NAME=VALUE", help="pipeline setting to override (repeatable)")
    p.add_argument("--limit", type=int, default=0, help="run at most this many sequences (0: all)")
    p.add_argument("--shard", default="", metavar="I/N", help="run only every N-th sequence starting at I (0-based): N processes "
                   "with I = 0..N-1 share a tier and append to the same results")
    p.add_argument("--render-only", action="store_true", help="only render and cache the tier's frames (no pipeline, no results)")
    p.add_argument("--part", choices=("all", "sequences", "single_frame", "first_frame"), default="all",
                   help="the tracked sequences, the single-frame registrations (van de Kraats row), the first frame without a pose "
                   "(SCR-PnP, needs --models), or all three (first_frame only with --models)")
    p.add_argument("--models", type=Path, default=None, help="model folder with the SCR model for the first-frame part")
    args = p.parse_args(argv)
    try:
        overrides = _parse_set(args.set)
        sources = [s for s in args.sources.split(",") if s]
        bad = [s for s in sources if s not in SOURCES]
        if bad:
            raise ConfigError(f"unknown source(s) {bad}; choose from {SOURCES}")
        specs = [s for s in tier_specs(args.tier, args.split) if s.source in sources]
        shard = _parse_shard(args.shard)
        if shard:
            specs = specs[shard[0] :: shard[1]]
        if args.limit:
            specs = specs[: args.limit]
        if args.render_only:
            print(f"benchmark: rendered {render_only(specs)} sequences")
            return 0
        out = args.out or Path("reports/benchmark") / f"{args.tier}_{args.split}"
        t0 = time.perf_counter()
        if args.part in ("all", "sequences"):
            run(specs, out, overrides)
        if args.part in ("all", "single_frame"):
            sf = [s for s in single_frame_specs(args.tier, args.split) if s.source in sources]
            sf = sf[shard[0] :: shard[1]] if shard else sf
            run_single_frame(sf[: args.limit] if args.limit else sf, out, SINGLE_FRAME_STARTS[args.tier], overrides)
        if args.part == "first_frame" or (args.part == "all" and args.models is not None):
            if args.models is None:
                raise ConfigError("--part first_frame needs --models (a folder with scr.pt)")
            ff = [s for s in first_frame_specs(args.tier, args.split) if s.source in sources]
            ff = ff[shard[0] :: shard[1]] if shard else ff
            run_first_frame(ff[: args.limit] if args.limit else ff, out, args.models, overrides)
        if not (out / "results.jsonl").exists():
            (out / "results.jsonl").touch()
        meta = {"command": "python -m reg2d3d_ros.eval.benchmark " + " ".join(argv if argv is not None else sys.argv[1:]),
                "overrides": overrides, "models_dir": str(args.models or ""), "seconds_last_run": round(time.perf_counter() - t0, 1)}
        path = write_report(out, args.tier, meta)
        print(path.read_text().split("\n## Sequences")[0])
        print(f"benchmark: report {path}")
    except Reg2D3DError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
