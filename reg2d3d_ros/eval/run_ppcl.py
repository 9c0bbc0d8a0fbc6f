"""Evaluation of the learned PPC updates (PPC-L, PPC Flow (Attention)) against classic PPC (writes the report).

Same held-out test cases as :mod:`.run_ppc` (vertebrae T6, T8, T10, T12, AP and lateral, the
same seeds, so the same frames and start poses); the PPC-L networks were trained on other
vertebrae (T3, T4, T5, T7, T9 and T11 for validation, :mod:`reg2d3d_ros.ppcl.train`). Two parts:

- **one update** at the coarsest level (the seeds' one-update studies; starts with initial mTRE
  over 0-45 mm): mTRE, mRPD and projection error after a single update of classic PPC (NGC
  weights, MCCR; 6 DoF, and in-plane as registration starts), PPC-L, and the flow operators
  (Flow, PPC Flow, PPC Flow Attention; ``--flow-dir``);
- **full registration** (van de Kraats protocol, seed Table 1): PPC-L (learned at every level),
  PPC-L+ (learned at 0.25 and 0.5, classic PPC at full resolution), PPC-L+ hybrid (the learned
  weights as prior weights inside the classic update: MCCR, anchor and trust region kept) and, with
  the flow model, PPC Flow Attention+ (flow operator at 0.25, classic above). Classic PPC's rows are read
  from ``reports/ppc/results.json`` when it holds the same cases (same starts, size, range),
  else run again.

Usage::

    python -m reg2d3d_ros.eval.run_ppcl --out reports/ppcl                 # about 40 minutes on 2 cores
    python -m reg2d3d_ros.eval.run_ppcl --quick --out /tmp/ppcl_quick      # minutes
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import run_cli


def one_update_study(ct, cases, learned, flows: dict | None = None, n_starts: int = 50, max_mtre_mm: float = 45.0, progress: bool = True) -> dict:
    """Errors after one coarsest-level update: ``{method: {metric: [...]}}``.

    Starts: ``n_starts`` per case with initial mTRE over ``[0, max_mtre_mm]`` (the seed's one-update
    study uses 0-45 mm; seeds differ from the registration starts). ``flows``: ``{name: FlowOperator}``.
    """
    from ..ppc import PPCL_CONFIG, PPCConfig, PPCRegistrator
    from ..ppc.register import IN_PLANE, _levels
    from .metrics import mrpd, mtre, projection_error_px
    from .starts import random_starts

    classic = PPCConfig()
    flows = flows or {}
    methods = ["initial", "PPC (6 DoF)", "PPC (in-plane)", "PPC-L", *flows]
    out = {k: {"mtre_mm": [], "mrpd_mm": [], "pe_px": [], "ms": []} for k in methods}
    regs = {}
    for ci, case in enumerate(cases):
        if case.vertebra not in regs:
            regs[case.vertebra] = PPCRegistrator.from_ct(ct, case.vertebra, learned=learned)
        reg = regs[case.vertebra]
        s, _, search, nominal = _levels(PPCL_CONFIG, case.intrinsics)[0]
        intr = case.intrinsics.scaled(s)
        fixed = reg.fixed_gradients(case.image_att, [s])[s]
        K_full = case.intrinsics.K(torch.float64)
        ops = {"PPC (6 DoF)": {}, "PPC (in-plane)": {"dof_mask": IN_PLANE}, "PPC-L": {"weighter": learned.weighter(nominal)}}
        for name, op in flows.items():
            ops[name] = {"weighter": op.weighter(), "matcher": op.matcher()}
        starts, _ = random_starts(case.T_gt, case.target_pts, n_starts, max_mtre_mm=max_mtre_mm, seed=case.seed + 999)
        for T in starts:
            runs = {"initial": (T, 0.0)}
            for name, kw in ops.items():
                t0 = time.perf_counter()
                T_new, _ = reg.update(T, fixed, intr, search, config=classic, **kw)
                runs[name] = (T_new, 1000 * (time.perf_counter() - t0))
            for name, (Tn, ms) in runs.items():
                out[name]["mtre_mm"].append(float(mtre(Tn, case.T_gt, case.target_pts)))
                out[name]["mrpd_mm"].append(float(mrpd(Tn, case.T_gt, case.target_pts)))
                out[name]["pe_px"].append(float(projection_error_px(Tn, case.T_gt, case.target_pts, K_full)))
                out[name]["ms"].append(ms)
        if progress:
            print(f"  one update [{ci + 1}/{len(cases)}] {case.vertebra} {case.view}", flush=True)
    return out


def reduction_factor(before, after) -> np.ndarray:
    """The seed's per-sample reduction factor: ``1 - after / before`` where the error fell, else 0."""
    b, a = np.asarray(before, dtype=float), np.asarray(after, dtype=float)
    return np.where(a < b, 1.0 - a / np.maximum(b, 1e-12), 0.0)


def _stats(x) -> str:
    x = np.asarray(x)
    return f"{np.percentile(x, 50):.2f} | {np.percentile(x, 75):.2f} | {np.percentile(x, 95):.2f} | {x.mean():.2f} ± {x.std():.2f}"


def write_report(out: Path, meta: dict, one: dict, reg: dict, training: dict | None) -> None:
    """Markdown + JSON."""
    from .run_ppc import registration_tables

    out.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Learned PPC updates: PPC-L and PPC-L+ against classic PPC (simulated cases)",
        "",
        "**All numbers are on simulated X-ray frames** of the example CT (whole-CT DRRs with noise, scatter and blur); "
        "the test vertebrae (T6, T8, T10, T12) were never seen in training"
        + (f" ({', '.join(training['meta']['vertebrae'][:-1])} train, {training['meta']['vertebrae'][-1]} validates)." if training else "."),
        "",
        f"Generated by `python -m reg2d3d_ros.eval.run_ppcl {meta['argv']}` on {meta['machine']}, {meta['date']}; model `{meta['model']}`.",
        "",
    ]
    if training:
        tm = training["meta"]
        lines += [
            f"Training (`python -m reg2d3d_ros.ppcl.train --quality ...`): {tm['frames_per_view']} frames per vertebra and view, "
            f"{tm['starts']} starts per frame (initial mTRE 0-{tm['max_mtre_mm']:.0f} mm), {tm['epochs']} epochs per level, objective "
            f"{tm.get('loss', 'pe')}, {tm['seconds_total']} s on CPU. Validation projection error after one update (T11):",
            "",
            "| level | PE before [px] | PE after, best epoch [px] | median after [px] | starts under 10 px: before -> after [px] |",
            "|---|---|---|---|---|",
        ]
        for k, h in training["history"].items():
            b = min(h, key=lambda r: r.get("val_log_ratio", r["val_pe_px"]))
            small = f"{b['val_pe_small_before_px']:.1f} -> {b['val_pe_small_after_px']:.1f}" if "val_pe_small_after_px" in b else "-"
            lines.append(f"| {float(k):g} | {b['val_pe_before_px']:.1f} | {b['val_pe_px']:.1f} | {b['val_pe_median_px']:.1f} | {small} |")
        lines.append("")
    if one:
        lines += [
            "## One update at the coarsest level (the seeds' one-update studies)",
            "",
            f"{meta['one_update_starts']} starts per test case ({len(one['initial']['mtre_mm'])} in all), initial mTRE uniform over 0-45 mm "
            "(other seeds than the registration's starts); one update at the 0.25 level (frames 512x512). mTRE over the vertebra's voxels; PE: their mean projection distance, "
            "pixels of the full frame; reduction factor as in the seed (per start, 1 - after/before where the error fell, else 0; mean ± std).",
            "",
            "| update | mTRE p50 | p75 | p95 | mean ± std [mm] | mRPD p50 [mm] | PE p50 [px] | reduction factor | time per update [ms] |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        m0 = np.asarray(one["initial"]["mtre_mm"])
        for name, d in one.items():
            rf = reduction_factor(m0, d["mtre_mm"])
            red = "-" if name == "initial" else f"{rf.mean():.2f} ± {rf.std():.2f}"
            ms = "-" if name == "initial" else f"{np.median(d['ms']):.0f}"
            lines.append(f"| {name} | {_stats(d['mtre_mm'])} | {np.median(d['mrpd_mm']):.2f} | {np.median(d['pe_px']):.1f} | {red} | {ms} |")
        lines += [
            "",
            "The seed's PPC Flow table, for comparison: Flow 7.45 / 15.20 / 34.59, 11.27 ± 11.66 mm; PPC Flow 5.03 / 8.80 / 15.41, "
            "6.21 ± 4.70; PPC Flow Attention 4.70 / 8.31 / 14.68, 5.88 ± 4.50 (p50 / p75 / p95, mean ± std).",
            "",
        ]
    lines += [
        "## Full registration (van de Kraats protocol, seed Table 1 layout)",
        "",
        f"{meta['n_cases']} test cases x {meta['n_starts']} starts, frames {meta['size']}x{meta['size']}. Success: mRPD < 2 mm; "
        "gross success < 10 mm; CR/GCR: largest initial mTRE below which every 1-mm bin has >= 95 % success.",
        "",
        "| method | mRPD [mm] | SR [%] | CR [mm] | GSR [%] | GCR [mm] | iterations | time [s] |",
        "|---|---|---|---|---|---|---|---|",
    ]
    table, summaries = registration_tables(reg, meta["views"], meta["max_mtre_mm"])
    lines += table
    lines += ["", "Per test case, SR [%]:", "", "| case | " + " | ".join(reg) + " |", "|---|" + "---|" * len(reg)]
    first = next(iter(reg.values()))
    for key in dict.fromkeys((r["vertebra"], r["view"]) for r in first):
        cells = [f"{100 * np.mean([r['final_mrpd_mm'] < 2 for r in rows if (r['vertebra'], r['view']) == key]):.0f}" for rows in reg.values()]
        lines.append(f"| {key[0]} {key[1]} | " + " | ".join(cells) + " |")
    lines += ["", "The seeds (clinical data): PPC SR 79.3 %, CR 3 mm; PPC-L SR 94.3 %, CR 13 mm; PPC-L+ SR 96.1 %, CR 19 mm, mRPD 0.74 mm. "
              "One update from 0-45 mm (CBCT data, initial mean 20.59 mm): Flow 11.27 ± 11.66 mm (reduction 0.47), PPC Flow 6.21 ± 4.70 (0.68), "
              "PPC Flow Attention 5.88 ± 4.50 (0.69).", ""]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps({"meta": meta, "summary": summaries, "one_update": one, "registration": reg}, indent=1))


def _save_partial(out: Path, reg: dict, args) -> None:
    """Registration results so far (an interrupted run resumes from them)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    blob = json.loads(path.read_text()) if path.exists() else {}
    meta = {"n_starts": args.starts, "size": args.size, "max_mtre_mm": args.max_mtre, "model": str(args.model)}
    if {k: blob.get("meta", {}).get(k) for k in meta} != meta:
        blob = {"meta": meta, "registration": {}}
    blob["registration"].update(reg)
    path.write_text(json.dumps(blob, indent=1))


def main(argv=None) -> int:
    """Entry point."""
    ap = argparse.ArgumentParser(prog="python -m reg2d3d_ros.eval.run_ppcl", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("reports/ppcl"))
    ap.add_argument("--model", type=Path, default=Path("models/ppcl/ppcl.pt"))
    ap.add_argument("--flow-dir", type=Path, default=Path("models/ppcflow"), help="folder of flow.pt / ppc_flow.pt / ppc_flow_attention.pt")
    ap.add_argument("--one-update-starts", type=int, default=50, help="starts per case of the one-update study (0-45 mm)")
    ap.add_argument("--classic", type=Path, default=Path("reports/ppc/results.json"), help="classic PPC results to reuse")
    ap.add_argument("--starts", type=int, default=50)
    ap.add_argument("--max-mtre", type=float, default=30.0)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--quick", action="store_true", help="one case, 4 starts (a smoke run)")
    ap.add_argument("--fresh", action="store_true", help="do not reuse registration results of an earlier run in OUT")
    ap.add_argument("--skip-one-update", action="store_true", help="registration only (reuse nothing of the one-update study)")
    ap.add_argument("--no-flow-registration", action="store_true", help="the flow model in the one-update study only")
    args = ap.parse_args(argv)
    return run_cli(lambda: _run(args, argv), "python -m reg2d3d_ros.eval.run_ppcl")


def _run(args, argv) -> int:
    from ..example import load_example
    from ..ppc import PPCL_CONFIG, PPCL_HYBRID_CONFIG, PPCL_PLUS_CONFIG, PPCConfig
    from ..ppcflow import FlowOperator
    from ..ppcl import LearnedWeighting
    from ..sim import CArmSetup
    from .cases import TEST, CaseSet, make_cases
    from .run_ppc import evaluate_registration

    learned = LearnedWeighting.load(args.model)
    names = {"flow": "Flow", "ppc_flow": "PPC Flow", "ppc_flow_attention": "PPC Flow Attention"}
    flows = {names[k]: FlowOperator.load(args.flow_dir / f"{k}.pt") for k in names if (args.flow_dir / f"{k}.pt").exists()}
    case_set = TEST
    if args.quick:
        case_set = CaseSet("quick", ("T8",), views=("lateral",), seed=0)
        args.starts = 4
        args.one_update_starts = 6
    t0 = time.time()
    ct = load_example()
    cases = make_cases(ct, case_set, args.starts, max_mtre_mm=args.max_mtre, setup=CArmSetup().at_size(args.size))
    one = {} if args.skip_one_update else one_update_study(ct, cases, learned, flows, n_starts=args.one_update_starts)
    reg = {}
    stored = json.loads(args.classic.read_text()) if args.classic.exists() and not args.quick else None
    if stored and (stored["meta"]["n_starts"], stored["meta"]["size"], stored["meta"]["max_mtre_mm"]) == (args.starts, args.size, args.max_mtre):
        reg["PPC"] = stored["registration"]["PPC"]
        reused = True
    else:
        reg.update(evaluate_registration(ct, cases, {"PPC": PPCConfig()}))
        reused = False
    # PPC-L at every level needs a network per level; PPC-L+ only the coarse ones
    configs = {"PPC-L": PPCL_CONFIG} if set(PPCL_CONFIG.levels) <= set(learned.levels) else {}
    configs["PPC-L+"] = PPCL_PLUS_CONFIG
    configs["PPC-L+ hybrid"] = PPCL_HYBRID_CONFIG
    att = flows.get("PPC Flow Attention")
    if att is not None and not args.no_flow_registration:
        configs["PPC Flow Attention+"] = PPCConfig(flow_levels=(0.25,))
    previous = json.loads((args.out / "results.json").read_text()) if (args.out / "results.json").exists() and not args.fresh else None
    same = previous is not None and (previous["meta"]["n_starts"], previous["meta"]["size"], previous["meta"]["max_mtre_mm"], previous["meta"]["model"]) == (
        args.starts, args.size, args.max_mtre, str(args.model))
    for name, cfg in configs.items():
        if same and name in previous["registration"]:
            reg[name] = previous["registration"][name]  # finished before (e.g. while another model trained)
            print(f"  {name}: reusing the registration results in {args.out / 'results.json'}", flush=True)
        else:
            reg.update(evaluate_registration(ct, cases, {name: cfg}, learned=learned, flow=att))
            _save_partial(args.out, reg, args)
    train_json = args.model.with_suffix(".json")
    meta = {
        "argv": " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, CPU",
        "date": time.strftime("%Y-%m-%d"),
        "model": str(args.model),
        "flow_models": {k: str(args.flow_dir) for k in flows},
        "one_update_starts": args.one_update_starts,
        "n_cases": len(cases),
        "views": list(case_set.views),
        "n_starts": args.starts,
        "max_mtre_mm": args.max_mtre,
        "size": args.size,
        "classic_reused_from": str(args.classic) if reused else None,
        "wall_seconds": round(time.time() - t0),
    }
    write_report(args.out, meta, one, reg, json.loads(train_json.read_text()) if train_json.exists() else None)
    print(f"wrote {args.out / 'report.md'} ({meta['wall_seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
