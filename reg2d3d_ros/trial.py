"""``python -m reg2d3d_ros.trial``: try the node on a new CT (simulated frames, through the ROS 2 node, scored).

For a CT, its label map and a target (any CT: a new patient, a 3 mm series), it

1. simulates short fluoroscopy sequences around the target with the generalisation benchmark's
   randomised simulator (:mod:`reg2d3d_ros.eval.benchmark`, frame source ``randomised``: one
   seeded draw of physics, display and encoding per sequence; views, motions and starts of the
   benchmark's tiers), and writes each as a rosbag2 bag;
2. starts ``registration_node`` as a process per sequence (its own DDS domain) with this CT,
   label map and target, gives it frame 0's start pose on ``/registration/initial_pose`` (the
   ground truth, or 5 mm off for a ``perturbed`` sequence; with ``--init scr`` none: the node
   initialises itself with the SCR model of ``--models-dir``), and replays the bag into it in
   lock-step (every frame answered, whatever the machine's load);
3. scores every published pose against the ground truth (mRPD, mTRE, wrong poses: mRPD > 2 mm,
   as the benchmark) and writes ``report.md`` and ``summary.json``.

Everything goes under ``--out``: the bags, ``results.jsonl`` (one row per frame; a finished
sequence is skipped when the command is run again into the same folder), each node's log and
ROS log folder, the rendered frames' cache, ONNX exports and TensorRT engines. A folder used
for another CT or target is refused.

Tiers: ``tiny`` (2 sequences of 2-3 frames at 128x128: about a minute, for CI) and ``quick``
(the benchmark's five randomised quick sequences at 256x256: minutes on 2 CPU cores).

Usage::

    python -m reg2d3d_ros.trial --ct CT.nii.gz --labels LABELS.nii.gz --target L3 --out trial_L3
        [--label-table NAMES.csv | --label-set auto] [--resample-labels] [--tier tiny|quick]
        [--models-dir DIR [--init scr]] [--set NAME=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from .errors import ConfigError, run_cli
from .volume import add_ct_arguments

#: Frame size of each tier, pixels.
TIER_SIZE = {"tiny": 128, "quick": 256}
#: Frame rate of the simulated sequences (stamps), Hz.
FPS = 15.0


def tier_specs(tier: str, target: str) -> list:
    """The sequences of a trial tier around ``target`` (:class:`~reg2d3d_ros.eval.benchmark.SequenceSpec`, split ``trial``)."""
    from .eval.benchmark import SequenceSpec
    from .eval.benchmark import tier_specs as benchmark_tier

    if tier == "tiny":
        return [SequenceSpec("trial", "randomised", str(target), "lateral", "smooth", 3, "true", 1),
                SequenceSpec("trial", "randomised", str(target), "ap", "static", 2, "true", 2)]
    if tier == "quick":
        return [replace(s, split="trial", vertebra=str(target)) for s in benchmark_tier("quick", "heldout") if s.source == "randomised"]
    raise ConfigError(f"tier must be one of {', '.join(TIER_SIZE)}, got {tier!r}")


def node_parameter_overrides(items) -> dict:
    """``--set NAME=VALUE`` items as node parameters, each checked against the node's parameter table.

    Values are read as ROS reads ``-p NAME:=VALUE``: ``true``/``false``, an integer, a number, else text.

    Raises
    ------
    ConfigError
        Not ``NAME=VALUE``, an unknown parameter, one the trial sets itself, or a wrong value
        (the node's message: the parameter, its unit and range).
    """
    from .settings import BY_NAME, setting

    own = {"ct_path", "labels_path", "label_table_path", "label_set", "resample_labels", "target", "intensity", "models_dir"}
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set takes NAME=VALUE (a node parameter), got {item!r}")
        name, text = (x.strip() for x in item.split("=", 1))
        if name in own:
            raise ConfigError(f"--set {name}: the trial sets this parameter itself (use its own option)")
        if name not in BY_NAME:
            raise ConfigError(f"--set: unknown node parameter {name!r} (see config/registration.yaml)")
        value: object = text
        if text.lower() in ("true", "false"):
            value = text.lower() == "true"
        else:
            for kind in (int, float):
                try:
                    value = kind(text)
                    break
                except ValueError:
                    pass
        out[name] = setting(name).check(value)
    return out


def _node_value(v) -> str:
    """A parameter value as ``-p NAME:=VALUE`` text."""
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def _check_out_folder(out: Path, record: dict) -> None:
    """Refuse an output folder that holds a trial of another CT, label map, target or tier; record this one."""
    f = out / "trial.json"
    if f.is_file():
        try:
            old = json.loads(f.read_text())
        except (OSError, ValueError):
            old = None
        keys = ("ct_sha256", "labels_sha256", "target_id", "tier", "init", "models_dir", "parameters")
        if not isinstance(old, dict) or any(old.get(k) != record.get(k) for k in keys):
            differ = [k for k in keys if not isinstance(old, dict) or old.get(k) != record.get(k)]
            raise ConfigError(f"{out} holds a trial of other data or settings ({', '.join(differ)} differ, see {f}): "
                              "choose another --out, or delete that folder")
        return
    out.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps(record, indent=1))


def _pose_of(msg) -> torch.Tensor:
    from .geometry import pose_m_to_transform

    p, q = msg.pose.position, msg.pose.orientation
    return pose_m_to_transform(torch.tensor([p.x, p.y, p.z], dtype=torch.float64), torch.tensor([q.x, q.y, q.z, q.w], dtype=torch.float64))


def run(args) -> Path:
    """Run the trial; returns the report's path."""
    from .eval import benchmark as bm
    from .eval.metrics import mrpd, mtre
    from .provenance import check_models_provenance, content_sha256, target_record
    from .sim import CArmSetup
    from .sim.bag import write_sequence_bag
    from .sim.sequence import DEFAULT_START_NS, SimulatedSequence
    from .volume import load_ct

    t_start = time.perf_counter()
    out = Path(args.out).expanduser().resolve()
    overrides = node_parameter_overrides(args.set)
    if args.init == "scr":
        if not args.models_dir:
            raise ConfigError("--init scr needs --models-dir with an SCR model (made by python -m reg2d3d_ros.prepare)")
        if not (Path(args.models_dir) / "scr.pt").is_file():
            raise ConfigError(f"--init scr: no SCR model (scr.pt) in {args.models_dir}; make one with python -m reg2d3d_ros.prepare")
    print(f"[trial] loading CT {args.ct} and labels {args.labels}", flush=True)
    ct = load_ct(args.ct, labels_path=args.labels, label_table=args.label_table, label_set=args.label_set, resample_labels=args.resample_labels)
    target = target_record(ct, args.target)  # names the target's problem (unknown, no voxels) before anything is written
    models_dir = str(Path(args.models_dir).expanduser().resolve()) if args.models_dir else ""
    if models_dir:
        from .engines import check_models_dir

        check_models_dir(models_dir)
        check_models_provenance(models_dir, ct, args.target)  # the node would stay in waiting_for_ct: say it now
    size = TIER_SIZE[args.tier]
    record = {"ct": str(Path(args.ct).expanduser().resolve()), "ct_sha256": content_sha256(ct.source),
              "labels": str(Path(args.labels).expanduser().resolve()), "labels_sha256": content_sha256(ct.labels_source),
              "target": target["name"] or str(args.target), "target_id": target["id"], "tier": args.tier, "size": size,
              "init": args.init, "models_dir": models_dir, "parameters": {k: _node_value(v) for k, v in overrides.items()}}
    _check_out_folder(out, record)
    os.environ.setdefault("REG2D3D_ENGINE_CACHE", str(out / "engine_cache"))  # ONNX exports / TensorRT engines of the node: under --out
    specs = tier_specs(args.tier, args.target)
    results = out / "results.jsonl"
    done = bm.done_keys(results)
    setup = CArmSetup().at_size(size)
    intr = setup.intrinsics()
    spacing = " x ".join(f"{s:.2f}" for s in ct.spacing_mm)
    print(f"[trial] CT {'x'.join(map(str, ct.shape_ijk))} voxels of {spacing} mm; target {target['name'] or args.target} (id {target['id']}); "
          f"{len(specs)} sequences ({args.tier} tier, {size}x{size}), {len(done & {s.key for s in specs})} already in {results}", flush=True)
    params = {"ct_path": Path(args.ct).expanduser().resolve(), "labels_path": Path(args.labels).expanduser().resolve(),
              "label_set": args.label_set, "resample_labels": args.resample_labels, "target": str(args.target)}
    if args.label_table:
        params["label_table_path"] = Path(args.label_table).expanduser().resolve()
    if models_dir:
        params["models_dir"] = models_dir
    params.update(overrides)
    pts = torch.from_numpy(ct.label_points_ct_mm([target["id"]], max_points=1000, seed=0))
    from .ros.session import run_bag_through_node

    for i, spec in enumerate(specs):
        if spec.key in done:
            continue
        name = f"{i:02d}_{spec.view}_{spec.motion}_{spec.start}"
        folder = out / "sequences" / name
        folder.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        poses = bm.sequence_poses(ct, spec, setup)
        frames, encoding, intensity, meta = bm.sequence_frames(ct, str(ct.source), spec, setup, poses, {}, cache_root=out / "cache" / f"size_{size}")
        stamps = DEFAULT_START_NS + np.round(np.arange(len(frames)) * 1e9 / FPS).astype(np.int64)
        seq = SimulatedSequence(np.asarray(frames), encoding, intensity, poses.numpy(), intr, stamps,
                                meta={"trial": spec.key, **{k: v for k, v in meta.items() if v is not None}})
        bag = write_sequence_bag(seq, folder / "bag", overwrite=True)
        T_start = None
        if args.init != "scr":
            T_start = poses[0] if spec.start == "true" else bm.perturbed_start(poses[0], pts, spec.seed)
        t1 = time.perf_counter()
        print(f"[trial] sequence {i + 1}/{len(specs)}: {spec.view} view, {spec.motion} motion, {spec.frames} frames, {spec.start} start, "
              f"{encoding} {intensity} (simulated in {t1 - t0:.1f} s); node log {folder / 'node.log'}", flush=True)
        got = run_bag_through_node(bag, {**params, "intensity": intensity}, T_start, folder, rate=1.0, n_frames=len(seq),
                                   log=lambda m: print("        " + m.strip(), flush=True), lockstep=True)
        index = {int(s): f for f, s in enumerate(stamps)}
        published = {}
        for p in got["poses"]:
            f = index.get(p.header.stamp.sec * 10**9 + p.header.stamp.nanosec)
            if f is not None:
                published[f] = _pose_of(p)
        diag = got["diagnostics"]
        rows = []
        for f in range(len(seq)):
            row = {"key": spec.key, "frame": f, "answered": f in published, "state": "", "mode": "", "latency_ms": float("nan"),
                   "error": "", "confidence": float("nan")}
            if f in published:
                row["mrpd_mm"] = round(float(mrpd(published[f], poses[f], pts)), 3)
                row["mtre_mm"] = round(float(mtre(published[f], poses[f], pts)), 3)
            rows.append(row)
        latency = diag.get("latency_ms_median")
        seq_row = {"kind": "sequence", "key": spec.key, **asdict(spec), "encoding": encoding, "intensity": intensity, "size": size,
                   "node_latency_ms_median": float(latency) if latency else None, "node_state_at_end": diag.get("state"),
                   "node_last_error": diag.get("last_error", ""), "frames_dropped": int(diag.get("frames_dropped", 0) or 0),
                   "render_s": round(t1 - t0, 1), "run_s": round(time.perf_counter() - t1, 1), **meta}
        with open(results, "a") as fh:
            for r in rows:
                fh.write(json.dumps(r) + "\n")
            fh.write(json.dumps(seq_row) + "\n")
        sc = bm.score_sequence(seq_row, rows)
        print(f"        answered {sc['answered']}/{sc['scored']}, median mRPD {_f(sc['mrpd_median_mm'])} mm, median mTRE "
              f"{_f(sc['mtre_median_mm'], '{:.1f}')} mm, wrong {sc['wrong']}" +
              (f"; the node's last error: {seq_row['node_last_error']}" if seq_row["node_last_error"] else ""), flush=True)
    report = write_report(out, record, time.perf_counter() - t_start)
    print(report.read_text())
    print(f"trial: report {report}")
    return report


def _finite(obj):
    """``obj`` with every NaN or infinite float replaced by None (valid JSON)."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _f(x, fmt: str = "{:.2f}") -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)


def write_report(out: Path, record: dict, seconds: float) -> Path:
    """``out/report.md`` and ``out/summary.json`` from ``out/results.jsonl`` (the benchmark's scores)."""
    from .eval import benchmark as bm

    results = out / "results.jsonl"
    seqs, frames = bm.read_rows(results) if results.exists() else ([], [])
    by_key = {}
    for r in frames:
        by_key.setdefault(r["key"], []).append(r)
    per_seq = [(s, bm.score_sequence(s, by_key.get(s["key"], []))) for s in seqs]
    answered = [r for s, _ in per_seq for r in sorted(by_key.get(s["key"], []), key=lambda r: r["frame"])
                [bm.PERTURBED_GRACE_FRAMES if s["start"] == "perturbed" else 0:]]
    ans = [r for r in answered if r["answered"]]
    e = np.array([r["mrpd_mm"] for r in ans]) if ans else np.zeros(0)
    t = np.array([r["mtre_mm"] for r in ans]) if ans else np.zeros(0)
    lat = [s["node_latency_ms_median"] for s, _ in per_seq if s.get("node_latency_ms_median") is not None]
    total = {"sequences": len(seqs), "frames": len(answered), "answered": len(ans),
             "answered_pct": 100.0 * len(ans) / max(len(answered), 1),
             "mrpd_median_mm": float(np.median(e)) if len(e) else None, "mrpd_p95_mm": float(np.percentile(e, 95)) if len(e) else None,
             "mtre_median_mm": float(np.median(t)) if len(t) else None, "wrong": int((e > bm.WRONG_MRPD_MM).sum()),
             "node_latency_ms_median": float(np.median(lat)) if lat else None, "seconds_last_run": round(seconds, 1)}
    groups = bm.summarise(results) if results.exists() else []
    summary = {"trial": record, "total": total, "groups": groups,
               "sequences": [{"key": s["key"], **sc, "node_last_error": s.get("node_last_error", "")} for s, sc in per_seq]}
    (out / "summary.json").write_text(json.dumps(_finite(summary), indent=1))
    lines = [f"# Trial of the node on a new CT ({record['tier']} tier; simulated frames)", "",
             f"CT `{record['ct']}` (sha256 {record['ct_sha256'][:12]}), labels `{record['labels']}`, target {record['target']} "
             f"(id {record['target_id']}); {record['size']}x{record['size']} frames at {307.2 / record['size']:.2f} mm, SDD 1020 mm; "
             f"start: {'SCR-PnP of ' + record['models_dir'] if record['init'] == 'scr' else 'frame 0 on /registration/initial_pose'}; "
             f"node parameters {json.dumps(record['parameters'])}; lock-step replay. Wrong = published with mRPD > {bm.WRONG_MRPD_MM} mm; "
             f"perturbed starts ({bm.PERTURBED_START_MM:.0f} mm) are scored after the first {bm.PERTURBED_GRACE_FRAMES} frames.", "",
             f"**All: {total['answered']}/{total['frames']} frames answered ({total['answered_pct']:.0f} %), median mRPD "
             f"{_f(total['mrpd_median_mm'])} mm (p95 {_f(total['mrpd_p95_mm'])}), median mTRE {_f(total['mtre_median_mm'], '{:.1f}')} mm, "
             f"{total['wrong']} wrong, node latency median {_f(total['node_latency_ms_median'], '{:.0f}')} ms.**", "",
             "| sequence | encoding / intensity | answered | median mRPD mm | median mTRE mm | wrong | node's last error |",
             "|---|---|---|---|---|---|---|"]
    for s, sc in per_seq:
        lines.append(f"| {s['view']} {s['motion']} ({s['frames']} frames, {s['start']} start) | {s['encoding']} / {s['intensity']} | "
                     f"{sc['answered']}/{sc['scored']} | {_f(sc['mrpd_median_mm'])} | {_f(sc['mtre_median_mm'], '{:.1f}')} | {sc['wrong']} | "
                     f"{(s.get('node_last_error') or '')[:120]} |")
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def build_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    ap = argparse.ArgumentParser(prog="python -m reg2d3d_ros.trial", description=__doc__.split("\n\n")[0])
    add_ct_arguments(ap)
    ap.add_argument("--target", required=True, help="structure to register: a vertebra (L3), a TotalSegmentator name or a label id")
    ap.add_argument("--out", type=Path, required=True, help="output folder (everything the trial writes goes under it)")
    ap.add_argument("--tier", choices=sorted(TIER_SIZE), default="quick", help="tiny: 2 sequences of 2-3 frames at 128x128 (CI); quick: 5 of 6-16 frames at 256x256")
    ap.add_argument("--models-dir", default=None, help="the node's models_dir (made by python -m reg2d3d_ros.prepare for this CT and target)")
    ap.add_argument("--init", choices=("start", "scr"), default="start",
                    help="start: frame 0's start pose on /registration/initial_pose; scr: none, the node initialises with --models-dir's SCR model")
    ap.add_argument("--set", action="append", metavar="NAME=VALUE", help="node parameter (repeatable), e.g. --set search_range_mm=10")
    return ap


def _terminate(signum, frame):
    raise KeyboardInterrupt  # SIGTERM ends the trial as Ctrl-C does: the node it started is stopped


def main(argv=None) -> int:
    """Entry point."""
    import signal
    import threading

    args = build_parser().parse_args(argv)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        return run_cli(lambda: run(args), "python -m reg2d3d_ros.trial")
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
