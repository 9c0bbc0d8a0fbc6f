"""Train the PPC Flow update operators (Flow, PPC Flow, PPC Flow Attention) on simulated cases.

    python -m reg2d3d_ros.train_ppcflow --out models/ppcflow [--quality tiny|quick|full] [--kinds flow,ppc_flow,ppc_flow_attention]

Same training cases as :mod:`reg2d3d_ros.train_ppcl` (training vertebrae T3, T4, T5, T7, T9, T11
(validation), never the evaluation's T6, T8, T10, T12), by default with initial mTRE over 0-45 mm
as in the seed. Per start the coarsest level's gradient images and contour points are stored
once (``--cache``, resumable). Each kind trains with a checkpoint per epoch and resumes from
it. Output: ``OUT/<kind>.pt`` per kind (the node uses ``ppcflow.pt``: a copy of the
``--deploy`` kind) and ``OUT/ppcflow.json`` (metadata, histories).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from .errors import ConfigError, run_cli
from .train_ppcl import build_parser as _ppcl_parser, training_setup


def build_parser():
    ap = _ppcl_parser()
    ap.prog = "python -m reg2d3d_ros.train_ppcflow"
    ap.description = __doc__.split("\n\n")[0]
    ap.set_defaults(out=Path("models/ppcflow"), cache=Path("build/ppcflow_cache"), max_mtre=45.0)
    ap.add_argument("--kinds", default="flow,ppc_flow,ppc_flow_attention", help="which operators to train")
    ap.add_argument("--deploy", default="ppc_flow_attention", help="the kind copied to ppcflow.pt for the node")
    return ap


def collect(ct, vertebrae, frames_per_view: int, n_starts: int, max_mtre: float, size: int, seed: int, cache: Path) -> dict:
    """``{vertebra: [sample dict, ...]}``, computing and caching what is missing."""
    from .ppc import PPCConfig
    from .ppc.flow import flow_samples_for_case
    from .train_ppcl import cached_training_frames

    def per_frame(reg, cases):
        return [s for case in cases for s in flow_samples_for_case(reg, case, PPCConfig())]

    out = {}
    for vert, rows in cached_training_frames(ct, vertebrae, frames_per_view, n_starts, max_mtre, size, seed, cache, "flow_", per_frame,
                                             "gradient images"):
        out.setdefault(vert, []).extend(rows)
    return out


def _run(args) -> int:
    from .ppc.flow import KINDS, FlowTrainConfig, train_flow

    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    for k in kinds + [args.deploy]:
        if k not in KINDS:
            raise ConfigError(f"unknown kind {k!r} (choose from {', '.join(KINDS)})")
    # the flow operators train half as many epochs as PPC-L at the same quality (each costs far more)
    ct, vertebrae, frames, starts, epochs = training_setup(args, epochs_scale=0.5 if args.quality != "tiny" else 1.0)
    from .progress import Steps

    t0 = time.time()
    step = Steps(1 + len(kinds), stream=sys.stderr)
    step(f"collecting gradient images of {', '.join(vertebrae)} (cached in {args.cache})")
    data = collect(ct, vertebrae, frames, starts, args.max_mtre, args.size, args.seed, args.cache)
    t_data = time.time() - t0
    train = [s for v in vertebrae[:-1] for s in data[v]]
    val = data[vertebrae[-1]]
    step.note(f"{len(train)} training, {len(val)} validation samples")
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {"meta": {"vertebrae": vertebrae, "frames_per_view": frames, "starts": starts, "max_mtre_mm": args.max_mtre,
                        "size": args.size, "epochs": epochs, "seed": args.seed, "seconds_data": round(t_data)}, "kinds": {}}
    for kind in kinds:
        step(f"training {kind} ({epochs} epochs)")
        t1 = time.time()
        op, hist = train_flow(train, val, FlowTrainConfig(kind=kind, epochs=epochs), checkpoint=args.cache / f"{kind}.ckpt")
        op.meta.update(summary["meta"])
        op.save(args.out / f"{kind}.pt")
        best = hist[op.meta["best_epoch"]]
        summary["kinds"][kind] = {"history": hist, "best": best, "seconds": round(time.time() - t1)}
        print(f"{kind}: validation mTRE {best['val_mtre_before_mm']:.2f} -> {best['val_mtre_mm']:.2f} mm after one update, "
              f"EPE {best['val_epe_px']:.2f} px (epoch {best['epoch']})")
    if (args.out / f"{args.deploy}.pt").exists():
        shutil.copyfile(args.out / f"{args.deploy}.pt", args.out / "ppcflow.pt")
    summary["meta"]["deployed"] = args.deploy
    summary["meta"]["seconds_total"] = round(time.time() - t0)
    (args.out / "ppcflow.json").write_text(json.dumps(summary, indent=1))
    print(f"wrote {args.out} ({round(time.time() - t0)} s)")
    return 0


def main(argv=None) -> int:
    """Entry point."""
    args = build_parser().parse_args(argv)
    return run_cli(lambda: _run(args), "python -m reg2d3d_ros.train_ppcflow")


if __name__ == "__main__":
    sys.exit(main())
