"""Training of PPC-L: the correspondence weighting (one PointNet per resolution level) on simulated cases.

    python -m reg2d3d_ros.ppcl.train --out models/ppcl [--quality tiny|quick|full]

Training cases are simulated frames of the example CT (or ``--ct/--labels/--label-table``) of
the *training* vertebrae (default T3, T4, T5, T7, T9, T11; the evaluation's test vertebrae T6, T8,
T10, T12 are never used), AP and lateral views with jittered angles (10 deg) and isocentre
(15 mm), and start poses with initial mTRE uniform over ``[0, --max-mtre]``. The correspondences
of every start are searched once per level and cached under ``--cache`` (resumable: finished
cases are reused). Validation: the cases of the last training vertebra. Each level's training
writes a checkpoint per epoch and resumes from it. Output: ``OUT/ppcl.pt`` and ``OUT/ppcl.json``
(metadata and per-epoch history).

The training data are the stored correspondences of every start (:func:`samples_for_case`); one
learned update (:func:`update_and_error`) is differentiated through the PPC solver; the epoch loop
is :func:`reg2d3d_ros.training.fit`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, run_cli
from ..ppc.register import PPCConfig, PPCRegistrator, _levels, update_prior_precision
from ..ppc.solver import motion_about, solve_ppc
from ..training import cached_training_frames, fit, training_parser, training_setup
from .model import N_FEATURES, correspondence_features

QUALITY = {
    # frames per (vertebra, view), starts per frame, epochs
    "tiny": (1, 6, 3),
    "quick": (3, 30, 60),
    "full": (6, 50, 100),
}


# -- training data ------------------------------------------------------------------------------
@dataclass
class Sample:
    """One precomputed training sample (a start pose's correspondences at one level)."""

    features: torch.Tensor  # (N, F) float32
    w_opt: torch.Tensor  # (N, 3) float64, optical frame of T_start, mm
    g_opt: torch.Tensor  # (N, 3) float64
    uv_corr: torch.Tensor  # (N, 2) float64, pixels of the level
    K: torch.Tensor  # (3, 3) float64, the level
    noise_mm: float
    T_start: torch.Tensor  # (4, 4) float64
    T_gt: torch.Tensor  # (4, 4) float64
    K_full: torch.Tensor  # (3, 3) float64, the frame
    target_pts: torch.Tensor  # (P, 3) float64, CT frame, mm
    group: str  # vertebra and view (validation split key)


def samples_for_case(reg: PPCRegistrator, case, config: PPCConfig, n_targets: int = 100, starts=None) -> dict:
    """``{nominal level: [Sample, ...]}`` of one simulated case (every start, every level of ``config``)."""
    levels = _levels(config, case.intrinsics)
    fixed = reg.fixed_gradients(case.image_att, [lv[0] for lv in levels])
    idx = np.linspace(0, len(case.target_pts) - 1, min(n_targets, len(case.target_pts))).round().astype(int)
    tgt = case.target_pts[idx].to(torch.float64)
    K_full = case.intrinsics.K(torch.float64)
    out = {}
    for s, _, search, nominal in levels:
        intr = case.intrinsics.scaled(s)
        rows = []
        for T in (case.starts if starts is None else starts):
            corr = reg.correspond(T, fixed[s], intr, search, config)
            if len(corr) < 12:
                continue
            c = corr.contours
            rows.append(Sample(
                features=correspondence_features(corr), w_opt=c.w_opt, g_opt=c.g_opt, uv_corr=corr.uv_corr, K=corr.K,
                noise_mm=float((c.w_opt[:, 2] / corr.K[0, 0]).mean()), T_start=T.to(torch.float64), T_gt=case.T_gt.to(torch.float64),
                K_full=K_full, target_pts=tgt, group=f"{case.vertebra}-{case.view}-{case.seed}",
            ))
        out[nominal] = rows
    return out


def _batch(samples: list, n_points: int, rng: np.random.Generator):
    """Stack samples to fixed ``n_points`` (random subset, or zero padding with a mask)."""
    B = len(samples)
    F = samples[0].features.shape[1]
    feats = torch.zeros(B, n_points, F)
    w = torch.zeros(B, n_points, 3, dtype=torch.float64)
    g = torch.zeros_like(w)
    uv = torch.zeros(B, n_points, 2, dtype=torch.float64)
    mask = torch.zeros(B, n_points, dtype=torch.bool)
    for b, s in enumerate(samples):
        n = s.features.shape[0]
        sel = torch.from_numpy(rng.choice(n, size=min(n, n_points), replace=False))
        k = len(sel)
        feats[b, :k], w[b, :k], g[b, :k], uv[b, :k], mask[b, :k] = s.features[sel], s.w_opt[sel], s.g_opt[sel], s.uv_corr[sel], True
        # padded rows: a harmless copy of the first point with weight 0 (keeps the equations finite)
        if k < n_points:
            w[b, k:], g[b, k:], uv[b, k:] = s.w_opt[sel[0]], s.g_opt[sel[0]], s.uv_corr[sel[0]]
    return feats, w, g, uv, mask


def _batched_projection_error_px(T_est: torch.Tensor, T_gt: torch.Tensor, pts_ct_mm: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """``(B,)`` mean projection distance (pixels of ``K``) of points ``(B, P, 3)`` under poses ``(B, 4, 4)``."""
    def proj(T):
        x = pts_ct_mm @ T[:, :3, :3].transpose(1, 2) + T[:, None, :3, 3]
        q = x @ K.transpose(1, 2)
        return q[..., :2] / q[..., 2:3]

    return torch.linalg.norm(proj(T_est) - proj(T_gt), dim=-1).mean(dim=-1)


def update_and_error(net, samples: list, config: PPCConfig, n_points: int, rng: np.random.Generator):
    """``(PE after, PE before)`` ``(B,)`` of one learned update on a batch of samples (differentiable)."""
    feats, w, g, uv, mask = _batch(samples, n_points, rng)
    weights = net(feats, mask).to(torch.float64)
    K = torch.stack([s.K for s in samples])
    prec = torch.stack([update_prior_precision(config, s.noise_mm) for s in samples])
    sol = solve_ppc(w, g, uv, K, weights, lam=config.lam, prior_precision=prec)
    T_start = torch.stack([s.T_start for s in samples])
    T_gt = torch.stack([s.T_gt for s in samples])
    T_new = motion_about(sol.dv, sol.center) @ T_start
    pts = torch.stack([s.target_pts for s in samples])
    K_full = torch.stack([s.K_full for s in samples])
    return _batched_projection_error_px(T_new, T_gt, pts, K_full), _batched_projection_error_px(T_start, T_gt, pts, K_full)


@dataclass(frozen=True)
class PPCLTrainConfig:
    """Training of one level's weighting network."""

    epochs: int = 60
    batch: int = 16
    n_points: int = 1024
    lr: float = 1e-3
    local: tuple = (32, 64)
    head: tuple = (64, 32)
    seed: int = 0
    #: ``pe``: the seed's objective, the mean PE after the update; ``relative``: the mean of
    #: ``log((PE_after + 1) / (PE_before + 1))``, which weighs every start equally. With ``pe`` the
    #: large-error starts dominate and the network learned to move near-correct starts away (on
    #: the validation vertebra, PE 3.0 -> 7.0 px from starts under 5 px at the 0.25 level).
    loss: str = "relative"


def train_level(train: list, val: list, config: PPCConfig, tcfg: PPCLTrainConfig, checkpoint: Path | None = None, progress: bool = True):
    """Train one level's network on precomputed samples; returns ``(net, history)``.

    Resumes from ``checkpoint`` when it exists and matches; writes it after every epoch. The
    network of the best validation epoch (by the training objective) is returned.
    """
    from ..nets import CorrespondenceWeightNet

    if not train or not val:
        raise ConfigError("PPC-L training needs training and validation samples")
    torch.manual_seed(tcfg.seed)
    net = CorrespondenceWeightNet(N_FEATURES, tcfg.local, tcfg.head)
    opt = torch.optim.Adam(net.parameters(), lr=tcfg.lr)
    meta = {"config": json.loads(json.dumps(asdict(tcfg))), "n_train": len(train), "n_val": len(val)}

    def batch_loss(batch, rng):
        pe, pe0 = update_and_error(net, batch, config, tcfg.n_points, rng)
        return torch.log((pe + 1.0) / (pe0 + 1.0)).mean() if tcfg.loss == "relative" else pe.mean()

    history, _ = fit({"model": net}, opt, train, epochs=tcfg.epochs, lr=tcfg.lr, batch=tcfg.batch, seed=tcfg.seed, batch_loss=batch_loss,
                     evaluate=lambda: evaluate_level(net, val, config, tcfg.n_points),
                     key=lambda row: row["val_log_ratio"] if tcfg.loss == "relative" else row["val_pe_px"],
                     describe=lambda row: (f"train loss {row['train_loss']:.3f}, val PE {row['val_pe_px']:.1f} px "
                                           f"(under 10 px: {row['val_pe_small_before_px']:.1f} -> {row['val_pe_small_after_px']:.1f})"),
                     label="  PPC-L", clip_norm=1.0, meta=meta, checkpoint=checkpoint, progress=progress)
    return net.eval(), history


def evaluate_level(net, samples: list, config: PPCConfig, n_points: int) -> dict:
    """Mean PE (pixels) after one learned update, before it, and after the classic NGC-weighted solve."""
    rng = np.random.default_rng(123)
    net.eval()
    after, before = [], []
    with torch.no_grad():
        for i in range(0, len(samples), 32):
            a, b = update_and_error(net, samples[i : i + 32], config, n_points, rng)
            after.append(a)
            before.append(b)
    net.train()
    a, b = torch.cat(after), torch.cat(before)
    small = b < 10.0
    return {"val_pe_px": float(a.mean()), "val_pe_before_px": float(b.mean()), "val_pe_median_px": float(a.median()),
            "val_log_ratio": float(torch.log((a + 1.0) / (b + 1.0)).mean()),
            "val_pe_small_before_px": float(b[small].mean()) if bool(small.any()) else float("nan"),
            "val_pe_small_after_px": float(a[small].mean()) if bool(small.any()) else float("nan")}


# -- the command ---------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = training_parser("python -m reg2d3d_ros.ppcl.train", __doc__.split("\n\n")[0], "models/ppcl", "build/ppcl_cache", "ppcl.pt / ppcl.json",
                         QUALITY, ("--starts", "start poses per frame"), 512, 2000)
    ap.add_argument("--max-mtre", type=float, default=30.0, help="largest initial mTRE of the starts, mm")
    ap.add_argument("--levels", default="0.25,0.5,1.0", help="resolution levels to train (PPC-L+ needs 0.25 and 0.5 only)")
    return ap


def _sample_to_blob(s) -> dict:
    return {k: getattr(s, k) for k in ("features", "w_opt", "g_opt", "uv_corr", "K", "T_start", "T_gt", "K_full", "target_pts")} | {
        "noise_mm": float(s.noise_mm), "group": s.group}


def _blob_to_sample(b: dict):
    return Sample(**b)


def collect(ct, vertebrae, frames_per_view: int, n_starts: int, max_mtre: float, size: int, seed: int, cache: Path, progress: bool = True,
            physics: str = "nominal") -> dict:
    """``{vertebra: {level: [Sample]}}``, computing and caching what is missing."""
    from ..ppc import PPCL_CONFIG

    def per_frame(reg, cases):
        blob = {}
        for case in cases:
            for level, rows in samples_for_case(reg, case, PPCL_CONFIG).items():
                blob.setdefault(repr(float(level)), []).extend(_sample_to_blob(s) for s in rows)
        return blob

    out = {}
    for vert, blob in cached_training_frames(ct, vertebrae, frames_per_view, n_starts, max_mtre, size, seed, cache, "", per_frame,
                                             "correspondences", progress, physics=physics):
        for level, rows in blob.items():
            out.setdefault(vert, {}).setdefault(float(level), []).extend(_blob_to_sample(b) for b in rows)
    return out


def _run(args) -> int:
    from ..ppc import PPCL_CONFIG
    from ..progress import Steps
    from .model import LearnedWeighting

    ct, vertebrae, frames, starts, epochs = training_setup(args, QUALITY)
    t0 = time.time()
    step = Steps(stream=sys.stderr)
    step(f"collecting correspondences of {', '.join(vertebrae)} (cached in {args.cache})")
    data = collect(ct, vertebrae, frames, starts, args.max_mtre, args.size, args.seed, args.cache, physics=args.physics)
    t_data = time.time() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    tcfg = PPCLTrainConfig(epochs=epochs)
    nets, histories = {}, {}
    try:
        levels = [float(x) for x in args.levels.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--levels must be comma-separated numbers, got {args.levels!r}") from None
    if not levels or any(all(abs(lv - x) > 1e-6 for x in PPCL_CONFIG.levels) for lv in levels):
        raise ConfigError(f"--levels must be among {', '.join(str(x) for x in PPCL_CONFIG.levels)}")
    for level in levels:
        train = [s for v in vertebrae[:-1] for s in data[v].get(level, [])]
        val = [s for s in data[vertebrae[-1]].get(level, [])]
        step(f"training PPC-L level {level}: {len(train)} training, {len(val)} validation samples, {epochs} epochs")
        net, hist = train_level(train, val, PPCL_CONFIG, tcfg, checkpoint=args.cache / f"ppcl_level{level:g}.ckpt")
        nets[level], histories[repr(level)] = net, hist
    meta = {
        "local": list(tcfg.local), "head": list(tcfg.head), "features": 13, "levels": levels,
        "vertebrae": vertebrae, "frames_per_view": frames, "starts": starts, "max_mtre_mm": args.max_mtre, "size": args.size,
        "epochs": epochs, "loss": tcfg.loss, "seed": args.seed, "seconds_data": round(t_data), "seconds_total": round(time.time() - t0),
    }
    LearnedWeighting(nets, meta).save(args.out / "ppcl.pt")
    (args.out / "ppcl.json").write_text(json.dumps({"meta": meta, "history": histories}, indent=1))
    best = {k: min(h, key=lambda r: r["val_log_ratio"] if tcfg.loss == "relative" else r["val_pe_px"]) for k, h in histories.items()}
    for k, b in best.items():
        print(f"level {k}: validation PE {b['val_pe_before_px']:.1f} px -> {b['val_pe_px']:.1f} px (median {b['val_pe_median_px']:.1f}) after one update")
    print(f"wrote {args.out / 'ppcl.pt'} ({round(time.time() - t0)} s)")
    return 0


def main(argv=None) -> int:
    """Entry point."""
    args = build_parser().parse_args(argv)
    return run_cli(lambda: _run(args), "python -m reg2d3d_ros.ppcl.train")


if __name__ == "__main__":
    sys.exit(main())
