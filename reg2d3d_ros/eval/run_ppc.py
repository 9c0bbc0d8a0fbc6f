"""Evaluation of PPC registration and tracking on simulated cases (writes the report).

Registration follows the van de Kraats protocol on the :data:`~reg2d3d_ros.eval.cases.TEST`
cases (vertebrae T6, T8, T10, T12 of the example CT, AP and lateral views with random C-arm
jitter, simulated frames of the whole CT with noise, scatter and blur; start positions with
initial mTRE spread evenly over 0-30 mm) and reports the seed's Table 1: mRPD mean +- std over
successes, SR (mRPD < 2 mm), CR, GSR (< 10 mm), GCR, mean iterations and time per registration.
Tracking runs simulated sequences (breathing + drift, one sudden 15 mm jump) of the same
vertebrae through the node's pipeline, started from the ground truth of frame 0, and reports the
error of the published poses, wrong poses published, frames judged lost, whether the jump was
caught, and the time per tracking update.

Nothing here was tuned on these cases: parameters were chosen on the
:data:`~reg2d3d_ros.eval.cases.TUNING` cases (T7, T9, T11, other seeds).

Usage::

    python -m reg2d3d_ros.eval.run_ppc --out reports/ppc            # full (about an hour on 2 cores)
    python -m reg2d3d_ros.eval.run_ppc --quick --out /tmp/ppc_quick # a few cases, minutes
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from ..errors import run_cli

#: A tracking frame is declared lost when the inlier fraction of its update falls below this.


def evaluate_registration(ct, cases, configs: dict, progress: bool = True, learned=None, flow=None, moving: str = "target") -> dict:
    """Run every configuration on every start of every case; returns per-method raw results.

    ``learned`` (a :class:`~reg2d3d_ros.ppcl.LearnedWeighting`) serves configurations with
    ``learned_levels``, ``flow`` (a :class:`~reg2d3d_ros.ppcflow.FlowOperator`) those with ``flow_levels``.
    """
    from ..ppc import PPCRegistrator
    from .metrics import mrpd

    regs = {}
    out = {name: [] for name in configs}
    for ci, case in enumerate(cases):
        if case.vertebra not in regs:
            regs[case.vertebra] = PPCRegistrator.from_ct(ct, case.vertebra, learned=learned, flow=flow, moving=moving)
        reg = regs[case.vertebra]
        for name, cfg in configs.items():
            for k in range(len(case.starts)):
                r = reg.register(case.image_att, case.intrinsics, case.starts[k], config=cfg)
                out[name].append(
                    {
                        "vertebra": case.vertebra,
                        "view": case.view,
                        "initial_mtre_mm": float(case.initial_mtre[k]),
                        "initial_mrpd_mm": float(mrpd(case.starts[k], case.T_gt, case.target_pts)),
                        "final_mrpd_mm": float(mrpd(r.T_optical_from_ct, case.T_gt, case.target_pts)),
                        "iterations": r.iterations,
                        "seconds": r.seconds,
                        "inlier_fraction": r.inlier_fraction,
                    }
                )
                if r.polish:
                    out[name][-1].update(
                        mrpd_before_polish_mm=float(mrpd(r.polish["T_before"], case.T_gt, case.target_pts)),
                        polish_seconds=r.polish["seconds"], polish_kept=bool(r.polish["kept"]), polish_moved_mm=r.polish["moved_mm"])
            if progress:
                rows = out[name][-len(case.starts):]
                sr = 100 * np.mean([r["final_mrpd_mm"] < 2 for r in rows])
                print(f"  [{ci + 1}/{len(cases)}] {case.vertebra} {case.view:7s} {name}: SR {sr:.0f}%", flush=True)
    return out


def without_polish(rows: list) -> list:
    """The rows of a polished method as the method without the polish: the PPC pose's error, the time less the polish's."""
    return [{**r, "final_mrpd_mm": r["mrpd_before_polish_mm"], "seconds": r["seconds"] - r["polish_seconds"]} for r in rows]


def optimum_offsets(ct, cases, moving: str = "target") -> list:
    """Diagnostic: register every case starting at its ground truth.

    A registration started at the truth ends at the nearest optimum of the method on that frame;
    its distance from the truth (mRPD) bounds what any start can achieve on the frame and tells
    capture failures (the optimum is near the truth but was not reached) from frames whose
    optimum lies elsewhere (the target is hidden by overlapping anatomy).
    """
    from ..ppc import PPCRegistrator
    from .metrics import mrpd

    regs, rows = {}, []
    for case in cases:
        if case.vertebra not in regs:
            regs[case.vertebra] = PPCRegistrator.from_ct(ct, case.vertebra, moving=moving)
        r = regs[case.vertebra].register(case.image_att, case.intrinsics, case.T_gt)
        rows.append({"vertebra": case.vertebra, "view": case.view, "mrpd_from_truth_mm": float(mrpd(r.T_optical_from_ct, case.T_gt, case.target_pts)), "inlier_fraction": r.inlier_fraction})
    return rows


def evaluate_tracking(ct, vertebrae, views, n_frames: int, size: int, seed: int, progress: bool = True, jump_frame: int = 40,
                      jump_mm: float = 15.0, moving: str = "target", search_range_mm: float = 0.0, polish: bool = False,
                      guard: bool = False) -> list:
    """Track simulated sequences through the node's pipeline, with one sudden jump.

    Each sequence is smooth motion (breathing + drift) with, at ``jump_frame``, a sudden
    translation of ``jump_mm`` along the image x axis (the patient or table is bumped). The frames
    go through :class:`~reg2d3d_ros.pipeline.RegistrationPipeline` exactly as the node processes
    them: frame 0 is initialised from its ground truth, the rest are tracked; a frame judged lost
    gets no pose and the next one is re-initialised from the last good pose. Reported: poses
    published, frames judged lost, the error of the published poses (and how many were wrong,
    > 2 mm: the safety number), whether the jump frame was caught, and update times.
    """
    from ..images import encode_image
    from ..pipeline import INITIALISING, PipelineConfig, RegistrationPipeline, ppc_configs
    from ..ppc import PPCRegistrator
    from ..sim import CArmSetup, XrayDegradation, make_trajectory, simulate_sequence, structure_center, view_pose, xray_renderer
    from ..volume import resolve_label
    from .metrics import mrpd

    renderer = xray_renderer(ct)
    setup = CArmSetup().at_size(size)
    rows = []
    k = 0
    for vert in vertebrae:
        reg = PPCRegistrator.from_ct(ct, vert, moving=moving)
        pts = torch.from_numpy(ct.label_points_ct_mm([resolve_label(vert, ct.label_names)], max_points=1000, seed=0))
        center = structure_center(ct, vert)
        for view in views:
            s = seed + k
            k += 1
            T0 = view_pose(center, setup, view)
            poses = make_trajectory("smooth", T0, n_frames, center, setup, seed=s).clone()
            if 0 < jump_frame < n_frames:
                poses[jump_frame:, 0, 3] += jump_mm  # optical x: the vertebra jumps across the image
            seq = simulate_sequence(renderer, setup.intrinsics(), poses, XrayDegradation(), seed=s)
            pipe = RegistrationPipeline(PipelineConfig(moving_image=moving, search_range_mm=search_range_mm, polish=polish, guard=guard))
            pipe.registrator, pipe.state = reg, INITIALISING
            pipe.register_config, pipe.track_config = ppc_configs(pipe.config)
            ci = setup.intrinsics().to_camera_info()
            pipe.set_camera_info(ci["k"], ci["width"], ci["height"])
            pipe.set_initial_pose(poses[0])
            errs, times, lost, modes = [], [], [], []
            for f in range(n_frames):
                e = encode_image(seq.images[f], seq.encoding)
                r = pipe.process(e["encoding"], e["height"], e["width"], e["step"], e["data"])
                times.append(r.seconds)
                modes.append(r.details.get("mode", ""))
                lost.append(r.T_optical_from_ct is None)
                errs.append(float(mrpd(r.T_optical_from_ct, poses[f], pts)) if r.T_optical_from_ct is not None else float("nan"))
            e = np.asarray(errs)
            pub = ~np.isnan(e)
            track_t = [t for t, m in zip(times, modes) if m == "track"]
            init_t = [t for t, m in zip(times, modes) if m == "initialise"]
            after = [f for f in range(jump_frame, n_frames) if pub[f] and e[f] < 2.0]
            motion = [float(mrpd(poses[0], poses[f], pts)) for f in range(1, min(jump_frame, n_frames))]
            row = {
                "vertebra": vert,
                "view": view,
                "frames": n_frames,
                "motion_mrpd_max_mm": float(np.max(motion)),
                "published": int(pub.sum()),
                "judged_lost": int((~pub).sum()),
                "mrpd_median_mm": float(np.median(e[pub])) if pub.any() else float("nan"),
                "mrpd_p95_mm": float(np.percentile(e[pub], 95)) if pub.any() else float("nan"),
                "mrpd_max_mm": float(e[pub].max()) if pub.any() else float("nan"),
                "published_over_2mm": int((e[pub] > 2).sum()),
                "published_over_2mm_before_jump": int((e[:jump_frame][pub[:jump_frame]] > 2).sum()),
                "jump_frame_caught": bool(not pub[jump_frame]) if jump_frame < n_frames else None,
                "frames_to_recover": (after[0] - jump_frame) if after else None,
                "update_ms_median": 1e3 * float(np.median(track_t)) if track_t else float("nan"),
                "update_ms_p95": 1e3 * float(np.percentile(track_t, 95)) if track_t else float("nan"),
                "initialise_s_median": float(np.median(init_t)) if init_t else float("nan"),
                "per_frame_mrpd_mm": [None if np.isnan(x) else round(x, 3) for x in errs],
            }
            rows.append(row)
            if progress:
                print(f"  tracking {vert} {view:7s}: {row['published']}/{n_frames} poses, median mRPD {row['mrpd_median_mm']:.2f} mm, "
                      f"{row['published_over_2mm']} published > 2 mm, jump caught: {row['jump_frame_caught']}, "
                      f"recovered after {row['frames_to_recover']} frames, {row['update_ms_median']:.0f} ms/update", flush=True)
    return rows


def _fmt_row(name: str, s: dict) -> str:
    return (f"| {name} | {s['mrpd_mean_mm']:.2f} ± {s['mrpd_std_mm']:.2f} | {s['sr_percent']:.1f} | {s['cr_mm']:.0f} | "
            f"{s['gsr_percent']:.1f} | {s['gcr_mm']:.0f} | {s['iterations_mean']:.1f} | {s['seconds_mean']:.2f} |")


def registration_tables(reg_results: dict, views, max_mtre_mm: float):
    """Markdown rows of the registration table (seed Table 1 layout) and of SR per view and 5-mm bin.

    Returns ``(lines, summaries)``; ``lines`` starts with the table's first data row (the caller
    writes the header) and ``summaries`` holds :func:`.metrics.summarize` per method.
    """
    from .metrics import summarize

    lines, summaries = [], {}
    for name, rows in reg_results.items():
        s = summarize([r["initial_mtre_mm"] for r in rows], [r["final_mrpd_mm"] for r in rows],
                      [r["iterations"] for r in rows], [r["seconds"] for r in rows], max_mm=max_mtre_mm)
        summaries[name] = s
        lines.append(_fmt_row(name, s))
    lines += ["", "Per view and 5-mm bin of initial mTRE (SR %):", ""]
    bins = list(range(0, int(max_mtre_mm), 5))
    lines += ["| method | view | " + " | ".join(f"{b}-{b + 5}" for b in bins) + " |", "|---|---|" + "---|" * len(bins)]
    for name, rows in reg_results.items():
        for view in views:
            rv = [r for r in rows if r["view"] == view]
            cells = []
            for b in bins:
                sel = [r["final_mrpd_mm"] < 2 for r in rv if b <= r["initial_mtre_mm"] < b + 5]
                cells.append(f"{100 * np.mean(sel):.0f}" if sel else "-")
            lines.append(f"| {name} | {view} | " + " | ".join(cells) + " |")
    return lines, summaries


def write_report(out: Path, meta: dict, reg_results: dict, tracking: list, optima: list | None = None) -> None:
    """Markdown + JSON report."""
    out.mkdir(parents=True, exist_ok=True)
    lines = [
        "# PPC registration and tracking on simulated cases",
        "",
        "**All numbers are on simulated X-ray frames** (the example CT, LIDC-IDRI-0001; no real X-ray with a",
        "known pose exists here). Frames are DRRs of the whole CT (overlapping anatomy) with quantum noise,",
        "scatter and detector blur; the registration's contour points are the target vertebra's; its moving image "
        + ("is all bone of the crop around the target (15 mm margin: neighbours and ribs included, `--moving roi`)."
           if meta.get("moving") == "roi" else "is the target's bone only (`--moving target`)."),
        "",
        f"Generated by `python -m reg2d3d_ros.eval.run_ppc {meta['argv']}` on {meta['machine']}, {meta['date']}.",
        "",
        "## Registration (van de Kraats protocol, seed Table 1 layout)",
        "",
        f"Test cases: vertebrae {', '.join(meta['vertebrae'])} x views {', '.join(meta['views'])}, "
        f"{meta['n_starts']} starts each with initial mTRE spread evenly over 0-{meta['max_mtre_mm']:.0f} mm "
        f"(rotations uniform up to 15 deg), frames {meta['size']}x{meta['size']} at {meta['pixel_mm']:.2f} mm "
        "(SDD 1020 mm, SID 680 mm). Success: final mRPD < 2 mm (SR, CR), gross success < 10 mm (GSR, GCR); "
        "CR/GCR: largest initial mTRE below which every 1-mm bin has >= 95 % success. mRPD is the mean +- std over successes.",
        "",
        "| method | mRPD [mm] | SR [%] | CR [mm] | GSR [%] | GCR [mm] | iterations | time [s] |",
        "|---|---|---|---|---|---|---|---|",
    ]
    table, summaries = registration_tables(reg_results, meta["views"], meta["max_mtre_mm"])
    lines += table
    lines += ["", "The seed (PPC-L paper, clinical C-arm data, 0.62 mm pixels): PPC mRPD 0.75 ± 0.21 mm, SR 79.3 %, CR 3 mm, "
              "GSR 81.8 %, GCR 3 mm.", ""]
    if optima:
        lines += [
            "Diagnostic: each case registered *from its ground truth* (PPC). The result is the method's nearest optimum on",
            "that frame; when it is far from the truth, no start can succeed on the frame (the vertebra's edges are",
            "hidden by overlapping anatomy or confused with a neighbour's), which separates such frames from capture failures.",
            "",
            "| vertebra | view | mRPD of the optimum near the truth [mm] | inlier fraction | SR of PPC on this case [%] |",
            "|---|---|---|---|---|",
        ]
        first = next(iter(reg_results.values()))
        for o in optima:
            rows = [r for r in first if r["vertebra"] == o["vertebra"] and r["view"] == o["view"]]
            sr = 100 * np.mean([r["final_mrpd_mm"] < 2 for r in rows]) if rows else float("nan")
            lines.append(f"| {o['vertebra']} | {o['view']} | {o['mrpd_from_truth_mm']:.2f} | {o['inlier_fraction']:.2f} | {sr:.0f} |")
        lines.append("")
    if tracking:
        lines += [
            "## Tracking through the node's pipeline (simulated sequences with a sudden jump)",
            "",
            f"{meta['track_frames']}-frame sequences at 15 fps, {meta['track_size']}x{meta['track_size']}: breathing (2 mm) plus slow drift "
            "(up to 3 mm, 2 deg), and at frame 40 a sudden 15 mm jump across the image. The frames go through "
            "`RegistrationPipeline` exactly as the node processes them: frame 0 is initialised from its ground truth, then one "
            "full-resolution, in-plane PPC update per frame (`TRACKING_CONFIG`: rotation about the principal ray and image-plane "
            "translation; depth and out-of-plane rotation keep the last registration's values). A frame is judged lost (no pose) when "
            "its inlier fraction is below 0.3 or below 0.85 x its recent level; the next frame is then re-initialised from the last "
            "good pose" + (f" by PPC with the in-plane search ({meta['search_mm']:.0f} mm, as the node does by default)" if meta.get("search_mm") else
                           " by PPC without the in-plane search") + (" and the polish" if meta.get("polish") else "") + (", guarded" if meta.get("guard") else "") + "; a (re-)initialisation whose gradient correlation with the frame is below "
            f"{meta.get('accept_gradient_correlation', 0.0):g} publishes nothing (`accept_gradient_correlation`). 'Wrong poses published': poses with mRPD > 2 mm that the node would have published.",
            "",
            "| vertebra | view | motion before the jump [mm] | poses / frames | judged lost | median mRPD of published [mm] | p95 | max | wrong poses published (before the jump) | jump caught | frames to recover | update median / p95 [ms] |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in tracking:
            rec = "never" if r["frames_to_recover"] is None else str(r["frames_to_recover"])
            lines.append(f"| {r['vertebra']} | {r['view']} | {r['motion_mrpd_max_mm']:.1f} | {r['published']}/{r['frames']} | {r['judged_lost']} | "
                         f"{r['mrpd_median_mm']:.2f} | {r['mrpd_p95_mm']:.2f} | {r['mrpd_max_mm']:.2f} | "
                         f"{r['published_over_2mm']} ({r['published_over_2mm_before_jump']}) | {'yes' if r['jump_frame_caught'] else 'NO'} | {rec} | "
                         f"{r['update_ms_median']:.0f} / {r['update_ms_p95']:.0f} |")
        allf = np.array([x for r in tracking for x in r["per_frame_mrpd_mm"] if x is not None])
        n_all = sum(r["frames"] for r in tracking)
        lines += ["", f"All sequences: {len(allf)} poses for {n_all} frames; published poses: median mRPD {np.median(allf):.2f} mm, "
                  f"95th percentile {np.percentile(allf, 95):.2f} mm; {int((allf > 2).sum())} wrong poses (> 2 mm) published; "
                  f"jump caught in {sum(bool(r['jump_frame_caught']) for r in tracking)} of {len(tracking)} sequences.", ""]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps({"meta": meta, "summary": summaries, "registration": reg_results, "tracking": tracking, "optima": optima or []}, indent=1))


def main(argv=None) -> int:
    """Entry point."""
    ap = argparse.ArgumentParser(prog="python -m reg2d3d_ros.eval.run_ppc", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("reports/ppc"))
    ap.add_argument("--starts", type=int, default=50, help="start positions per case")
    ap.add_argument("--max-mtre", type=float, default=30.0)
    ap.add_argument("--size", type=int, default=512, help="registration frame size (pixels; detector 307 mm)")
    ap.add_argument("--track-size", type=int, default=256)
    ap.add_argument("--track-frames", type=int, default=60)
    ap.add_argument("--no-wang", action="store_true", help="skip the classic-recipe ablation")
    ap.add_argument("--moving", choices=["target", "roi"], default="target",
                    help="moving image: the target's bone only, or all bone of the crop around it (PPCRegistrator.from_ct)")
    ap.add_argument("--search-mm", type=float, default=0.0,
                    help="also run 'PPC + in-plane search' (PPCConfig.search_range_mm) and re-initialise tracking with it (0: off)")
    ap.add_argument("--polish", action="store_true",
                    help="with --search-mm: polish the search's registrations (PPCConfig.polish_levels, the node's default) and re-initialise "
                         "tracking with it; the report shows the search with and without the polish (the same runs: the pose before the polish, "
                         "its time less the polish's)")
    ap.add_argument("--guard", action="store_true",
                    help="with --search-mm: guard the search's registrations (pipeline.GUARD_SETTINGS, the node's default: updates judged "
                         "by the gradient correlation, the search's starts compared by it) and re-initialise tracking with it")
    ap.add_argument("--no-tracking", action="store_true")
    ap.add_argument("--quick", action="store_true", help="2 cases, 4 starts, 10 tracking frames (a smoke run)")
    ap.add_argument("--only-tracking", action="store_true",
                    help="reuse the registration results of OUT/results.json, run the tracking part again")
    ap.add_argument("--rewrite-report", action="store_true",
                    help="do not register again: rewrite OUT/report.md from OUT/results.json (recomputing the optimum diagnostic)")
    args = ap.parse_args(argv)
    return run_cli(lambda: _run(args, argv), "python -m reg2d3d_ros.eval.run_ppc")


def _run(args, argv) -> int:
    """Body of :func:`main`."""
    from ..example import load_example
    from ..pipeline import PipelineConfig
    from ..ppc import WANG_CONFIG, PPCConfig
    from ..sim import CArmSetup
    from .cases import TEST, CaseSet, make_cases

    case_set = TEST
    if args.quick:
        case_set = CaseSet("quick", ("T8",), seed=0)
        args.starts, args.track_frames = 4, 10
    t0 = time.time()
    ct = load_example()
    if args.rewrite_report or args.only_tracking:
        stored = json.loads((args.out / "results.json").read_text())
        meta = stored["meta"]
        cases = make_cases(ct, case_set, meta["n_starts"], max_mtre_mm=meta["max_mtre_mm"], setup=CArmSetup().at_size(meta["size"]))
        tracking = stored["tracking"]
        if args.only_tracking:
            tracking = evaluate_tracking(ct, case_set.vertebrae, case_set.views, meta["track_frames"], meta["track_size"], case_set.seed + 500,
                                         moving=meta.get("moving", "target"), search_range_mm=meta.get("search_mm", 0.0),
                                         polish=meta.get("polish", False), guard=meta.get("guard", False))
            meta["accept_gradient_correlation"] = PipelineConfig().accept_gradient_correlation
            meta["argv"] += " (tracking re-run with: " + " ".join(argv if argv is not None else sys.argv[1:]) + ")"
        write_report(args.out, meta, stored["registration"], tracking, optimum_offsets(ct, cases, moving=meta.get("moving", "target")))
        print(f"rewrote {args.out / 'report.md'}")
        return 0
    setup = CArmSetup().at_size(args.size)
    print(f"generating {len(case_set.vertebrae) * len(case_set.views)} cases x {args.starts} starts ({args.size}x{args.size})", flush=True)
    cases = make_cases(ct, case_set, args.starts, max_mtre_mm=args.max_mtre, setup=setup)
    configs = {"PPC": PPCConfig()}
    search_name = "PPC + in-plane search"
    if args.search_mm > 0:
        configs[search_name] = replace(PPCConfig(), search_range_mm=args.search_mm)
        if args.polish:
            from ..pipeline import POLISH_ITERATIONS, POLISH_LEVELS

            configs[search_name] = replace(configs[search_name], polish_levels=POLISH_LEVELS, polish_iterations=POLISH_ITERATIONS)
        if args.guard:
            from ..pipeline import GUARD_SETTINGS

            configs[search_name + " + guard"] = replace(configs.pop(search_name), **GUARD_SETTINGS)
            search_name += " + guard"
    if not args.no_wang:
        configs["PPC, classic recipe (no anchor, no in-plane phase)"] = WANG_CONFIG
    reg = evaluate_registration(ct, cases, configs, moving=args.moving)
    if args.search_mm > 0 and args.polish:
        polished = reg.pop(search_name)
        reg[search_name] = without_polish(polished)
        reg[search_name + " + polish"] = polished
    optima = optimum_offsets(ct, cases, moving=args.moving)
    tracking = [] if args.no_tracking else evaluate_tracking(ct, case_set.vertebrae, case_set.views, args.track_frames, args.track_size,
                                                             case_set.seed + 500, moving=args.moving, search_range_mm=args.search_mm,
                                                             polish=args.search_mm > 0 and args.polish, guard=args.search_mm > 0 and args.guard)
    meta = {
        "argv": " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, CPU",
        "date": time.strftime("%Y-%m-%d"),
        "vertebrae": list(case_set.vertebrae),
        "views": list(case_set.views),
        "n_starts": args.starts,
        "max_mtre_mm": args.max_mtre,
        "size": args.size,
        "pixel_mm": 307.2 / args.size,
        "track_size": args.track_size,
        "moving": args.moving,
        "search_mm": args.search_mm,
        "polish": bool(args.search_mm > 0 and args.polish),
        "guard": bool(args.search_mm > 0 and args.guard),
        "accept_gradient_correlation": PipelineConfig().accept_gradient_correlation,
        "track_frames": args.track_frames,
        "configs": {k: asdict(v) for k, v in configs.items()},
        "wall_seconds": round(time.time() - t0),
    }
    write_report(args.out, meta, reg, tracking, optima)
    print(f"wrote {args.out / 'report.md'} ({meta['wall_seconds']} s)")


if __name__ == "__main__":
    sys.exit(main())
