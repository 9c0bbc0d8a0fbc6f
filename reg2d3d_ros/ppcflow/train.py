"""Training of the PPC Flow update operators (Flow, PPC Flow, PPC Flow Attention) on simulated cases.

    python -m reg2d3d_ros.ppcflow.train --out models/ppcflow [--quality tiny|quick|full] [--kinds flow,ppc_flow,ppc_flow_attention]

Same training cases as :mod:`reg2d3d_ros.ppcl.train` (training vertebrae T3, T4, T5, T7, T9, T11
(validation), never the evaluation's T6, T8, T10, T12), by default with initial mTRE over 0-45 mm
as in the seed. Per start the coarsest level's gradient images and contour points are stored
once (``--cache``, resumable). Each kind trains with a checkpoint per epoch and resumes from
it. Output: ``OUT/<kind>.pt`` per kind (the node uses ``ppcflow.pt``: a copy of the
``--deploy`` kind) and ``OUT/ppcflow.json`` (metadata, histories).

The training samples (:func:`flow_samples_for_case`), one learned update (:func:`forward_update`) and
its losses; the epoch loop is :func:`reg2d3d_ros.training.fit`.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, run_cli
from ..ppc.contours import Contours
from ..ppc.register import PPCConfig, PPCRegistrator, _levels, update_prior_precision
from ..ppc.solver import motion_about, solve_ppc
from ..ppcl.train import QUALITY as PPCL_QUALITY, build_parser as _ppcl_parser
from ..training import cached_training_frames, fit, training_setup
from .model import KINDS, N_FEATURES, FlowOperator, attention_features


# -- training data ------------------------------------------------------------------------------
def flow_samples_for_case(reg: PPCRegistrator, case, config: PPCConfig, max_points: int = 256, n_targets: int = 100) -> list:
    """Training samples (dicts of tensors) of one case at the coarsest level of ``config``: one per start."""
    s, _, search, _ = _levels(config, case.intrinsics)[0]
    intr = case.intrinsics.scaled(s)
    if intr.height % 4 or intr.width % 4:
        raise ConfigError(f"the flow level's image ({intr.width}x{intr.height}) must have sides divisible by 4")
    fixed = reg.fixed_gradients(case.image_att, [s])[s]
    idx = np.linspace(0, len(case.target_pts) - 1, min(n_targets, len(case.target_pts))).round().astype(int)
    tgt = case.target_pts[idx].to(torch.float64)
    K = intr.K(torch.float64)
    gen = torch.Generator().manual_seed(int(case.seed))
    out = []
    for T in case.starts:
        c, gm = reg.contours_at(T, intr, config)
        if len(c) < 12:
            continue
        if len(c) > max_points:
            sel = torch.sort(torch.randperm(len(c), generator=gen)[:max_points]).values
            c = Contours(c.index[sel], c.w_opt[sel], c.g_opt[sel], c.uv[sel], c.normal_2d[sel])
        out.append({
            "fixed": fixed.to(torch.float16), "moving": gm.to(torch.float16), "w_opt": c.w_opt, "g_opt": c.g_opt, "uv": c.uv,
            "normal": c.normal_2d, "K": K, "search_px": torch.tensor(float(search)), "T_start": T.to(torch.float64),
            "T_gt": case.T_gt.to(torch.float64), "target_pts": tgt, "group": f"{case.vertebra}-{case.view}-{case.seed}",
        })
    return out


def _stack(samples: list, n_points: int):
    B = len(samples)
    out = {k: torch.zeros(B, n_points, d, dtype=torch.float64) for k, d in (("w_opt", 3), ("g_opt", 3), ("uv", 2), ("normal", 2))}
    mask = torch.zeros(B, n_points, dtype=torch.bool)
    for b, s in enumerate(samples):
        n = min(len(s["uv"]), n_points)
        for k in out:
            out[k][b, :n] = s[k][:n]
            out[k][b, n:] = s[k][0]  # padding: a copy of a real point, weight 0
        mask[b, :n] = True
    from ..nets.flownet import normalise_gradients

    fixed = normalise_gradients(torch.stack([s["fixed"].float() for s in samples]))
    moving = normalise_gradients(torch.stack([s["moving"].float() for s in samples]))
    K = torch.stack([s["K"] for s in samples])
    return fixed, moving, out, mask, K


def _project(K: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    q = x @ K.transpose(1, 2)
    return q[..., :2] / q[..., 2:3]


def forward_update(flow_net, attention_net, samples: list, n_points: int = 256):
    """One learned update on a batch; returns a dict of ``(B,)`` tensors: ``mtre_mm``, ``mtre_before_mm``, ``epe_px``."""
    from ..nets.flownet import sample_flow

    fixed, moving, d, mask, K = _stack(samples, n_points)
    flow = flow_net(fixed, moving)
    dp = sample_flow(flow, d["uv"].float()).to(torch.float64)
    T_start = torch.stack([s["T_start"] for s in samples])
    T_gt = torch.stack([s["T_gt"] for s in samples])
    # ground-truth flow of the contour points: where the same CT points project under the truth
    D = T_gt @ torch.linalg.inv(T_start)
    uv_gt = _project(K, d["w_opt"] @ D[:, :3, :3].transpose(1, 2) + D[:, None, :3, 3])
    m = mask.to(torch.float64)
    epe = (torch.linalg.norm(dp - (uv_gt - d["uv"]), dim=-1) * m).sum(1) / m.sum(1).clamp_min(1.0)
    search = torch.stack([s["search_px"] for s in samples]).to(torch.float64)
    if attention_net is not None:
        feats = attention_features(d["uv"], d["normal"], d["w_opt"], d["g_opt"], dp, K[:, 0, 0], search[:, None, None], mask)
        weights = attention_net(feats, mask).to(torch.float64)
    else:
        weights = m
    noise = (d["w_opt"][..., 2] * m).sum(1) / m.sum(1).clamp_min(1.0) / K[:, 0, 0]
    prec = torch.stack([update_prior_precision(PPCConfig(), float(v)) for v in noise])
    sol = solve_ppc(d["w_opt"], d["g_opt"], d["uv"] + dp, K, weights, prior_precision=prec)
    T_new = motion_about(sol.dv, sol.center) @ T_start
    pts = torch.stack([s["target_pts"] for s in samples])

    def tre(T):
        a = pts @ T[:, :3, :3].transpose(1, 2) + T[:, None, :3, 3]
        b = pts @ T_gt[:, :3, :3].transpose(1, 2) + T_gt[:, None, :3, 3]
        return torch.linalg.norm(a - b, dim=-1).mean(1)

    return {"mtre_mm": tre(T_new), "mtre_before_mm": tre(T_start), "epe_px": epe}


@dataclass(frozen=True)
class FlowTrainConfig:
    """Training of one flow operator."""

    kind: str = "ppc_flow_attention"
    epochs: int = 30
    batch: int = 16
    n_points: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-6
    epe_weight: float = 1.0
    width: int = 32
    max_displacement: int = 4
    local: tuple = (32, 64)
    head: tuple = (64, 32)
    seed: int = 0


def train_flow(train: list, val: list, tcfg: FlowTrainConfig, checkpoint: Path | None = None, progress: bool = True):
    """Train a flow operator on precomputed samples; returns ``(FlowOperator, history)`` (best validation epoch)."""
    from ..nets import CorrespondenceWeightNet
    from ..nets.flownet import FlowNetC

    if tcfg.kind not in KINDS:
        raise ConfigError(f"kind must be one of {', '.join(KINDS)}, got {tcfg.kind!r}")
    if not train or not val:
        raise ConfigError("flow training needs training and validation samples")
    torch.manual_seed(tcfg.seed)
    flow_net = FlowNetC(tcfg.width, tcfg.max_displacement)
    att = CorrespondenceWeightNet(N_FEATURES, tcfg.local, tcfg.head) if tcfg.kind == "ppc_flow_attention" else None
    params = list(flow_net.parameters()) + ([] if att is None else list(att.parameters()))
    opt = torch.optim.Adam(params, lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    meta = {"config": json.loads(json.dumps(asdict(tcfg))), "n_train": len(train), "n_val": len(val)}

    def batch_loss(batch, rng):
        r = forward_update(flow_net, att, batch, tcfg.n_points)
        return r["epe_px"].mean() if tcfg.kind == "flow" else r["mtre_mm"].mean() + tcfg.epe_weight * r["epe_px"].mean()

    history, best_epoch = fit({"flow": flow_net, "attention": att}, opt, train, epochs=tcfg.epochs, lr=tcfg.lr, batch=tcfg.batch,
                              seed=tcfg.seed, batch_loss=batch_loss, evaluate=lambda: evaluate_flow(flow_net, att, val, tcfg.n_points),
                              key=lambda row: row["val_epe_px"] if tcfg.kind == "flow" else row["val_mtre_mm"],
                              describe=lambda row: (f"loss {row['train_loss']:.2f}, val mTRE {row['val_mtre_mm']:.2f} mm, "
                                                    f"EPE {row['val_epe_px']:.2f} px"),
                              label=f"  {tcfg.kind}", clip_norm=5.0, meta=meta, checkpoint=checkpoint, progress=progress)
    meta_out = {"kind": tcfg.kind, "width": tcfg.width, "max_displacement": tcfg.max_displacement, "local": list(tcfg.local),
                "head": list(tcfg.head), "best_epoch": best_epoch}
    return FlowOperator(flow_net, att, meta_out), history


def evaluate_flow(flow_net, att, samples: list, n_points: int = 256) -> dict:
    """Validation means: mTRE after one update (mm), before it, and the EPE (pixels of the level)."""
    flow_net.eval()
    if att is not None:
        att.eval()
    rows = []
    with torch.no_grad():
        for i in range(0, len(samples), 16):
            rows.append(forward_update(flow_net, att, samples[i : i + 16], n_points))
    flow_net.train()
    cat = {k: torch.cat([r[k] for r in rows]) for k in rows[0]}
    return {"val_mtre_mm": float(cat["mtre_mm"].mean()), "val_mtre_before_mm": float(cat["mtre_before_mm"].mean()),
            "val_epe_px": float(cat["epe_px"].mean())}


# -- the command ---------------------------------------------------------------------------------
def build_parser():
    ap = _ppcl_parser()
    ap.prog = "python -m reg2d3d_ros.ppcflow.train"
    ap.description = __doc__.split("\n\n")[0]
    ap.set_defaults(out=Path("models/ppcflow"), cache=Path("build/ppcflow_cache"), max_mtre=45.0)
    ap.add_argument("--kinds", default="flow,ppc_flow,ppc_flow_attention", help="which operators to train")
    ap.add_argument("--deploy", default="ppc_flow_attention", help="the kind copied to ppcflow.pt for the node")
    return ap


def collect(ct, vertebrae, frames_per_view: int, n_starts: int, max_mtre: float, size: int, seed: int, cache: Path,
            physics: str = "nominal") -> dict:
    """``{vertebra: [sample dict, ...]}``, computing and caching what is missing."""
    def per_frame(reg, cases):
        return [s for case in cases for s in flow_samples_for_case(reg, case, PPCConfig())]

    out = {}
    for vert, rows in cached_training_frames(ct, vertebrae, frames_per_view, n_starts, max_mtre, size, seed, cache, "flow_", per_frame,
                                             "gradient images", physics=physics):
        out.setdefault(vert, []).extend(rows)
    return out


def _run(args) -> int:
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    for k in kinds + [args.deploy]:
        if k not in KINDS:
            raise ConfigError(f"unknown kind {k!r} (choose from {', '.join(KINDS)})")
    # the flow operators train half as many epochs as PPC-L at the same quality (each costs far more)
    ct, vertebrae, frames, starts, epochs = training_setup(args, PPCL_QUALITY, epochs_scale=0.5 if args.quality != "tiny" else 1.0)
    from ..progress import Steps

    t0 = time.time()
    step = Steps(1 + len(kinds), stream=sys.stderr)
    step(f"collecting gradient images of {', '.join(vertebrae)} (cached in {args.cache})")
    data = collect(ct, vertebrae, frames, starts, args.max_mtre, args.size, args.seed, args.cache, physics=args.physics)
    t_data = time.time() - t0
    train = [s for v in vertebrae[:-1] for s in data[v]]
    val = data[vertebrae[-1]]
    step.note(f"{len(train)} training, {len(val)} validation samples")
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {"meta": {"vertebrae": vertebrae, "frames_per_view": frames, "starts": starts, "max_mtre_mm": args.max_mtre,
                        "size": args.size, "epochs": epochs, "seed": args.seed, "physics": args.physics, "seconds_data": round(t_data)}, "kinds": {}}
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
    return run_cli(lambda: _run(args), "python -m reg2d3d_ros.ppcflow.train")


if __name__ == "__main__":
    sys.exit(main())
