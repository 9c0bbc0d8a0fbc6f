"""Evaluate intensity-based registration (NCC, GC, multi-scale NCC; each with and without CMA-ES).

Usage::

    python -m reg2d3d_ros.eval.run_intensity [--out reports/intensity] [--starts 3] [--quick] [--fresh]

Held-out simulated cases of the example CT (test vertebrae T6, T8, T10, T12; AP and lateral
views with jitter, :func:`reg2d3d_ros.eval.cases.make_cases`), start poses drawn like the seed
(``shared/seeds/correlation_driven_similarity.txt``): about the target's centre in the optical
frame, rotations ``N(0, 20)`` degrees per axis, in-plane translation ``N(0, 30)`` mm, depth
``N(0, 60)`` mm, each truncated at two standard deviations and redrawn until the target's centre
projects into the central 80 % of the frame (what the field of view allows). Every variant
registers the same starts. Reported: mTRE at the 50th/75th/95th percentile, SR (mTRE < 10 mm,
the seed's definition) and the time per registration. Rows are saved as they finish
(``results.json``) and reused on a re-run (``--fresh`` starts over); the report is
``report.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

VARIANTS = ("ncc", "gc", "mncc", "learned", "learned_gc")
#: Gradient stage of the learned similarity in the seed protocol (one level: the network's input size).
LEARNED_LEVEL = 0.5


def seed_like_starts(T_gt: torch.Tensor, pts_ct_mm: torch.Tensor, intrinsics, n: int, seed: int, rot_sd_deg: float = 20.0,
                     inplane_sd_mm: float = 30.0, depth_sd_mm: float = 60.0, truncate_sd: float = 2.0) -> torch.Tensor:
    """``(n, 4, 4)`` start poses ``P(xi) @ T_gt`` drawn like the seed (module docstring) about the target points' mean, float64, mm."""
    from .starts import seed_like_perturbations

    _, T = seed_like_perturbations(T_gt, pts_ct_mm.mean(0), intrinsics, n, np.random.default_rng(seed), rot_sd_deg=rot_sd_deg,
                                   inplane_sd_mm=inplane_sd_mm, depth_sd_mm=depth_sd_mm, truncate_sd=truncate_sd)
    return T


def jump_starts(T_gt: torch.Tensor, pts_ct_mm: torch.Tensor, n: int, seed: int, min_mm: float = 5.0, max_mm: float = 15.0,
                max_rot_deg: float = 5.0) -> torch.Tensor:
    """``(n, 4, 4)`` starts of the recovery protocol: the truth moved in-plane by 5-15 mm and rotated about the principal ray."""
    from ..geometry import transform_points
    from ..intensity.register import perturb_about

    rng = np.random.default_rng(seed)
    c_opt = transform_points(T_gt, pts_ct_mm.mean(0, keepdim=True))[0]
    out = []
    for _ in range(n):
        a = rng.uniform(0, 2 * math.pi)
        r = rng.uniform(min_mm, max_mm)
        xi = torch.tensor([0.0, 0.0, math.radians(rng.uniform(-max_rot_deg, max_rot_deg)), r * math.cos(a), r * math.sin(a), 0.0], dtype=torch.float64)
        out.append(perturb_about(xi[None], c_opt[None])[0] @ T_gt)
    return torch.stack(out)


def variant_config(name: str, cmaes: bool):
    """The intensity configuration of one evaluated variant (``ncc``/``gc``/``mncc``/``learned``, with or without CMA-ES)."""
    from ..intensity import IntensityConfig

    if name == "learned":
        # learning rates chosen on the validation vertebra T11 (0.01 rad / 1 mm beat 0.03 / 3 and 0.05 / 5 there)
        return IntensityConfig(metric=name, levels=(LEARNED_LEVEL,), iterations=(150,), lr_rot_rad=0.01, lr_trans_mm=1.0, patience=30, cmaes=cmaes,
                               cmaes_sigma_rot_rad=math.radians(3.0), cmaes_sigma_trans_mm=5.0, cmaes_population=16, cmaes_generations=40,
                               cmaes_time_budget_s=6.0)
    return IntensityConfig(metric=name, levels=(0.25, 0.5), iterations=(60, 30), cmaes=cmaes, cmaes_sigma_rot_rad=math.radians(3.0),
                           cmaes_sigma_trans_mm=5.0, cmaes_population=16, cmaes_generations=40, cmaes_time_budget_s=6.0)


def summary(initial, final, seconds) -> dict:
    """Percentiles of mTRE (mm), SR (mTRE < 10 mm) and median seconds."""
    f = np.asarray(final, dtype=float)
    return {"n": int(f.size), "p50": float(np.percentile(f, 50)), "p75": float(np.percentile(f, 75)), "p95": float(np.percentile(f, 95)),
            "sr": float(np.mean(f < 10.0)), "initial_p50": float(np.percentile(initial, 50)), "seconds_median": float(np.median(seconds))}


def write_report(out: Path, rows: list, meta: dict) -> None:
    """``report.md`` from the finished rows."""
    names = []
    for r in rows:
        if r["variant"] not in names:
            names.append(r["variant"])
    init = [r["initial_mtre_mm"] for r in rows if r["variant"] == names[0]] if names else []
    lines = ["# Intensity-based registration (NCC, GC, multi-scale NCC, learned similarity; with and without CMA-ES)", "",
             f"{meta['machine']}; {meta['date']}. Command: `{meta['command']}`.", "",
             f"Cases: test vertebrae {', '.join(meta['vertebrae'])}, views {', '.join(meta['views'])}, {meta['starts']} starts each "
             f"({len(init)} registrations per variant). Starts like the seed: rotation N(0, 20) deg per axis, in-plane N(0, 30) mm, "
             "depth N(0, 60) mm about the target's centre, truncated at 2 SD, target centre inside the central 80 % of the frame. "
             "Gradient stage: Adam, levels 0.25 then 0.5 of the frame (60 + 30 iterations at most); CMA-ES: population 16, "
             "sigma 3 deg / 5 mm, at most 40 generations or 6 s, at level 0.5. mTRE over the vertebra's label points; SR: mTRE < 10 mm.", ""]
    if meta.get("learned"):
        lines += [f"learned: the correlation-driven learned similarity `{meta['learned']['path']}` "
                  f"({meta['learned']['summary']}); one level (0.5 of the frame = the network's 128 px input), up to 150 Adam "
                  "iterations (0.01 rad, 1 mm per step at most; chosen on the validation vertebra T11), CMA-ES on the learned similarity as above. It sees the whole frame "
                  "(no footprint mask). learned_gc: that gradient stage, then the gc variant (with its CMA-ES where named) from its "
                  "result.", ""]
    if init:
        lines += [f"Initial mTRE: 50th {np.percentile(init, 50):.1f}, 75th {np.percentile(init, 75):.1f}, 95th {np.percentile(init, 95):.1f} mm.", ""]
    lines += ["| variant | mTRE 50th [mm] | 75th | 95th | SR [%] | median time [s] |", "|---|---|---|---|---|---|"]
    for name in names:
        rs = [r for r in rows if r["variant"] == name]
        s = summary([r["initial_mtre_mm"] for r in rs], [r["final_mtre_mm"] for r in rs], [r["seconds"] for r in rs])
        lines.append(f"| {name} | {s['p50']:.1f} | {s['p75']:.1f} | {s['p95']:.1f} | {100 * s['sr']:.1f} | {s['seconds_median']:.1f} |")
    if names:
        def key(name):
            rs = [r for r in rows if r["variant"] == name]
            s = summary([r["initial_mtre_mm"] for r in rs], [r["final_mtre_mm"] for r in rs], [r["seconds"] for r in rs])
            return (-s["sr"], s["p50"])

        lines += ["", f"Best variant by SR, then by median mTRE: **{min(names, key=key)}**."]
    lines += ["", "Seed (its own 47 CTs, 256x256): learned similarity + CMA-ES 50th 2.2 mm, SR 61 %; ProST + CMA-ES 2.6 mm.", ""]
    (out / "report.md").write_text("\n".join(lines))


def _recover_rows(ct, case, reg, variants, args, rows, done, res_path) -> None:
    """The recover protocol for one case: PPC alone vs the node's recover stage (each metric) then PPC, from the same jumps."""
    from ..eval.metrics import mrpd
    from ..pipeline import intensity_stage
    from ..ppc import PPCRegistrator

    ppc = PPCRegistrator.from_ct(ct, case.vertebra)
    starts = jump_starts(case.T_gt, case.target_pts, args.starts, seed=case.seed)
    for k in range(len(starts)):
        e0 = float(mrpd(starts[k], case.T_gt, case.target_pts))
        for name in ["off"] + variants:
            label = "PPC only" if name == "off" else f"{name} (in-plane, CMA-ES) + PPC"
            if (case.vertebra, case.view, k, label) in done:
                continue
            t0 = time.perf_counter()
            T, e_int = starts[k], e0
            if name != "off":
                T, _ = intensity_stage(reg, case.image_att, case.intrinsics, T, name, True, 2.0)
                e_int = float(mrpd(T, case.T_gt, case.target_pts))
            t_int = time.perf_counter() - t0
            T = ppc.register(case.image_att, case.intrinsics, T).T_optical_from_ct
            e1 = float(mrpd(T, case.T_gt, case.target_pts))
            rows.append({"vertebra": case.vertebra, "view": case.view, "start": k, "variant": label, "initial_mrpd_mm": e0,
                         "intensity_mrpd_mm": e_int, "final_mrpd_mm": e1, "intensity_seconds": t_int, "seconds": time.perf_counter() - t0})
            print(f"  {case.vertebra} {case.view:7s} jump {k}: {label:34s} mRPD {e0:5.1f} -> {e_int:5.1f} -> {e1:5.1f} mm "
                  f"({t_int:4.1f} s + PPC)", flush=True)
            res_path.write_text(json.dumps({"rows": rows}, indent=1))


def write_recover_report(out: Path, rows: list, meta: dict) -> None:
    """``report_recover.md``: success (mRPD < 2 mm after PPC) with and without the recover stage."""
    names = list(dict.fromkeys(r["variant"] for r in rows))
    lines = ["# The node's recover stage: intensity registration (in-plane) before PPC, after a jump", "",
             f"{meta['machine']}; {meta['date']}. Command: `{meta['command']}`.", "",
             f"Cases: test vertebrae {', '.join(meta['vertebrae'])}, views {', '.join(meta['views'])}, {meta['starts']} jumps each: the true "
             "pose moved in-plane by 5-15 mm (uniform, random direction) and rotated about the principal ray by up to 5 deg, as a "
             "sudden patient motion the tracker cannot follow. 'PPC only' is what the node does with recover off (PPC registration "
             "from the last good pose); the others run the recover stage's configuration (`pipeline.intensity_stage_config`, CMA-ES "
             "budget 2 s) and then PPC. Success: mRPD < 2 mm after PPC.", "",
             "| variant | success [%] | mRPD after intensity, median [mm] | final mRPD median [mm] | intensity time median [s] |",
             "|---|---|---|---|---|"]
    for name in names:
        rs = [r for r in rows if r["variant"] == name]
        fin = np.array([r["final_mrpd_mm"] for r in rs])
        mid = np.array([r["intensity_mrpd_mm"] for r in rs])
        lines.append(f"| {name} | {100 * np.mean(fin < 2.0):.1f} ({int(np.sum(fin < 2.0))}/{len(fin)}) | {np.median(mid):.2f} | {np.median(fin):.2f} | "
                     f"{np.median([r['intensity_seconds'] for r in rs]):.1f} |")
    init = [r["initial_mrpd_mm"] for r in rows if r["variant"] == names[0]] if names else []
    if init:
        lines += ["", f"Initial mRPD median {np.median(init):.1f} mm (range {min(init):.1f}-{max(init):.1f})."]
    (out / "report_recover.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    from ..errors import run_cli

    return run_cli(lambda: _run(argv), "python -m reg2d3d_ros.eval.run_intensity")


def _run(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m reg2d3d_ros.eval.run_intensity", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("reports/intensity"))
    ap.add_argument("--vertebrae", default="T6,T8,T10,T12")
    ap.add_argument("--views", default="ap,lateral")
    ap.add_argument("--starts", type=int, default=3, help="starts per case")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="metrics, each run without and with CMA-ES")
    ap.add_argument("--seed", type=int, default=3000)
    ap.add_argument("--protocol", choices=["seed", "recover"], default="seed",
                    help="seed: the seed's wide starts, 6 DoF; recover: the node's recover stage (in-plane 5-15 mm jumps, then PPC)")
    ap.add_argument("--similarity", type=Path, default=Path("models/similarity/similarity.pt"), help="model of the learned variant")
    ap.add_argument("--quick", action="store_true", help="one vertebra, one start: a smoke run")
    ap.add_argument("--fresh", action="store_true", help="ignore finished rows in OUT/results.json")
    args = ap.parse_args(argv)
    from ..errors import ConfigError
    from ..eval.cases import CaseSet, make_cases
    from ..eval.metrics import mtre
    from ..example import load_example
    from ..intensity import IntensityRegistrator

    verts = tuple(v for v in args.vertebrae.split(",") if v)
    views = tuple(v for v in args.views.split(",") if v)
    variants = [v for v in args.variants.split(",") if v]
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not verts or not views or args.starts < 1:
        raise ConfigError(f"variants must be among {', '.join(VARIANTS)} (got {bad}), with at least one vertebra, view and start")
    if args.quick:
        verts, args.starts = verts[:1], 1
    args.out.mkdir(parents=True, exist_ok=True)
    res_path = args.out / ("results.json" if args.protocol == "seed" else "results_recover.json")
    rows = [] if args.fresh or not res_path.exists() else json.loads(res_path.read_text())["rows"]
    done = {(r["vertebra"], r["view"], r["start"], r["variant"]) for r in rows}
    learned, learned_meta = None, None
    if {"learned", "learned_gc"} & set(variants):
        from ..similarity import LearnedSimilarity

        learned = LearnedSimilarity.load(args.similarity)
        m = learned.meta
        learned_meta = {"path": str(args.similarity), "summary": f"trained on {', '.join(m.get('vertebrae', ['?'])[:-1])}, validated on "
                        f"{(m.get('vertebrae') or ['?'])[-1]}; {m.get('n_train', '?')} training samples, best epoch "
                        f"{(m.get('best_epoch') or 0) + 1} of {m.get('epochs', '?')}"}
    ct = load_example()
    cases = make_cases(ct, CaseSet("intensity-test", verts, views=views, seed=args.seed), 1)
    t_all = time.time()
    for case in cases:
        reg = IntensityRegistrator.from_ct(ct, case.vertebra, learned=learned)
        if args.protocol == "recover":
            _recover_rows(ct, case, reg, variants, args, rows, done, res_path)
            continue
        starts = seed_like_starts(case.T_gt, case.target_pts, case.intrinsics, args.starts, seed=case.seed)
        for k in range(len(starts)):
            e0 = float(mtre(starts[k], case.T_gt, case.target_pts))
            for name in variants:
                for use_cmaes in (False, True):
                    label = name + (" + CMA-ES" if use_cmaes else "")
                    if (case.vertebra, case.view, k, label) in done:
                        continue
                    if name == "learned_gc":  # the learned similarity's gradient stage, then GC (and its CMA-ES) from there
                        r0 = reg.register(case.image_att, case.intrinsics, starts[k], config=variant_config("learned", False))
                        r = reg.register(case.image_att, case.intrinsics, r0.T_optical_from_ct, config=variant_config("gc", use_cmaes))
                        seconds = r0.seconds + r.seconds
                    else:
                        r = reg.register(case.image_att, case.intrinsics, starts[k], config=variant_config(name, use_cmaes))
                        seconds = r.seconds
                    e1 = float(mtre(r.T_optical_from_ct, case.T_gt, case.target_pts))
                    rows.append({"vertebra": case.vertebra, "view": case.view, "start": k, "variant": label, "initial_mtre_mm": e0,
                                 "final_mtre_mm": e1, "seconds": seconds, "similarity": r.similarity})
                    print(f"  {case.vertebra} {case.view:7s} start {k}: {label:16s} mTRE {e0:6.1f} -> {e1:6.1f} mm in {seconds:5.1f} s", flush=True)
                    res_path.write_text(json.dumps({"rows": rows}, indent=1))
    meta = {"machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, CPU", "date": time.strftime("%Y-%m-%d"),
            "command": "python -m reg2d3d_ros.eval.run_intensity " + " ".join(argv if argv is not None else sys.argv[1:]),
            "vertebrae": list(verts), "views": list(views), "starts": args.starts, "seconds": round(time.time() - t_all), "learned": learned_meta}
    (write_recover_report if args.protocol == "recover" else write_report)(args.out, rows, meta)
    print(f"wrote {args.out / ('report.md' if args.protocol == 'seed' else 'report_recover.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
