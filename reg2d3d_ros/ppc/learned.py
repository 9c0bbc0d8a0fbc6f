"""PPC-L: correspondence weights learned through the PPC solver (conventions: :mod:`reg2d3d_ros.geometry`).

Following the PPC-L seed (``shared/seeds/ppc_l_correspondence_weighting.txt``): a small PointNet
(:class:`reg2d3d_ros.nets.CorrespondenceWeightNet`) maps per-correspondence features to weights in
``(0, 1)`` times a learned global factor. The weights enter the regularised least squares of the
PPC model (:func:`.solver.solve_ppc`, the prior of :func:`.register.update_prior_precision` is the
regulariser) and the resulting motion is applied to the start pose. The training objective is built on
the *projection error* of target points after that single update,

    PE = mean_i || pi(M(w) T_start x_i) - pi(T_gt x_i) ||   (pixels of the full-resolution frame),

either its mean (the seed's) or, by default, the mean of ``log((PE + 1) / (PE_start + 1))`` (see
:class:`PPCLTrainConfig`); no per-correspondence labels are needed; correspondences are searched once per sample (NGC,
at the start pose) and stored. One network per nominal resolution level.

Features (``F = 13``, float32), for a correspondence at a level with intrinsics ``K``:
``(uv - mean uv) / (0.05 fx)`` (2), the 2-D normal (2), ``(w - mean w) / 30 mm`` (3), the unit 3-D
gradient (3), the shift along the normal over the search range (1), the NGC (1), the at-limit flag
(1). Positions are relative (translation-invariant); scales use the level's focal length so a
level's features mean the same at any frame size.

Model file ``ppcl.pt``: ``{"format", "version", "meta_json", "state_dicts": {level: state dict}}``
loaded with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, ModelLoadError
from .register import Correspondences, PPCConfig, PPCRegistrator, _levels, update_prior_precision
from .solver import motion_about, solve_ppc

FORMAT = "reg2d3d_ros.ppcl"
VERSION = 1
N_FEATURES = 13


def correspondence_features(corr: Correspondences) -> torch.Tensor:
    """``(N, 13)`` float32 features of one update's correspondences (see the module docstring)."""
    c = corr.contours
    fx = float(corr.K[0, 0])
    uv = (c.uv - c.uv.mean(dim=0, keepdim=True)) / (0.05 * fx)
    w = (c.w_opt - c.w_opt.mean(dim=0, keepdim=True)) / 30.0
    shift = corr.shift_px / max(corr.search_px, 1)
    f = torch.cat([uv, c.normal_2d, w, c.g_opt, shift[:, None], corr.score[:, None], corr.at_limit[:, None].to(uv.dtype)], dim=1)
    return f.to(torch.float32)


class LearnedWeighting:
    """PPC-L weighting networks per nominal resolution level.

    Parameters
    ----------
    nets : dict
        ``{nominal level: CorrespondenceWeightNet}``.
    meta : dict
        Training metadata (written to the model file).
    """

    def __init__(self, nets: dict, meta: dict | None = None):
        self.nets = {float(k): v.eval() for k, v in nets.items()}
        self.meta = meta or {}
        #: ``{level: engines.Engine}`` that replace the PyTorch modules for inference (:meth:`attach_engines`)
        self.engines = {}

    def attach_engines(self, path, backend: str = "auto", device: str = "auto") -> list:
        """Run the networks of the model file ``path`` on an inference back-end (:func:`reg2d3d_ros.engines.load`); returns the engines."""
        from ..engines import load

        self.engines = {k: load(path, f"level_{k:g}", backend, device) for k in self.levels}
        return list(self.engines.values())

    @property
    def levels(self) -> tuple:
        return tuple(sorted(self.nets))

    def net_for(self, nominal: float):
        for k, net in self.nets.items():
            if abs(k - nominal) < 1e-6:
                return net
        raise ConfigError(f"the PPC-L model has no network for resolution level {nominal} (it has {list(self.levels)})")

    def weighter(self, nominal: float):
        """Callable ``Correspondences -> (N,) weights`` for one nominal level."""
        net = self.net_for(nominal)
        engine = next((e for k, e in self.engines.items() if abs(k - nominal) < 1e-6), None)

        def weigh(corr: Correspondences) -> torch.Tensor:
            feats = correspondence_features(corr)
            if engine is not None:
                return engine(feats[None], torch.ones(feats.shape[:1], dtype=torch.bool)[None])[0].to(corr.uv_corr.dtype)
            with torch.no_grad():
                return net(feats[None])[0].to(corr.uv_corr.dtype)

        return weigh

    def save(self, path) -> None:
        """Write ``ppcl.pt`` (plain tensors and JSON)."""
        sds = {repr(k): {n: t.detach().cpu().contiguous() for n, t in net.state_dict().items()} for k, net in self.nets.items()}
        torch.save({"format": FORMAT, "version": VERSION, "meta_json": json.dumps(self.meta), "state_dicts": sds}, Path(path))

    @classmethod
    def load(cls, path) -> "LearnedWeighting":
        """Load ``ppcl.pt``; raises :class:`ModelLoadError` with the reason if it is unusable."""
        from ..nets import CorrespondenceWeightNet

        from ..engines import read_model_blob

        blob = read_model_blob(path, FORMAT, VERSION, "PPC-L model", "train it with python -m reg2d3d_ros.train_ppcl")
        try:
            meta = json.loads(blob["meta_json"])
            nets = {}
            for k, sd in blob["state_dicts"].items():
                net = CorrespondenceWeightNet(N_FEATURES, tuple(meta["local"]), tuple(meta["head"]))
                net.load_state_dict(sd)
                nets[float(k)] = net
        except Exception as exc:
            raise ModelLoadError(f"PPC-L model {path} does not match the network ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
        return cls(nets, meta)


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


def _bar(what: str, done: int, total: int, elapsed: float, extra: str = "") -> None:
    frac = done / max(1, total)
    eta = elapsed / max(frac, 1e-9) - elapsed
    n = int(30 * frac)
    print(f"\r{what} [{'#' * n}{'.' * (30 - n)}] {done}/{total} {elapsed:.0f} s, {eta:.0f} s left {extra}", end="", file=sys.stderr, flush=True)


def matching_checkpoint(checkpoint, meta: dict):
    """The checkpoint at ``checkpoint`` if it exists and was written for ``meta`` (the epoch count
    aside: more epochs continue a finished training), else None."""
    if checkpoint is None or not Path(checkpoint).exists():
        return None
    ck = torch.load(checkpoint, map_location="cpu", weights_only=True)
    a, b = json.loads(ck["meta_json"]), json.loads(json.dumps(meta))
    a["config"].pop("epochs", None)
    b["config"].pop("epochs", None)
    return ck if a == b else None


def set_cosine_lr(opt, base_lr: float, epoch: int, epochs: int) -> None:
    """Cosine decay from ``base_lr`` to a tenth of it over the epochs."""
    lr = base_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * epoch / max(1, epochs))))
    for grp in opt.param_groups:
        grp["lr"] = lr


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
    history, start, best = [], 0, None
    ck = matching_checkpoint(checkpoint, meta)
    if ck is not None:
        net.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        history = json.loads(ck["history_json"])
        best = ck["best"]
        start = len(history)
    rng = np.random.default_rng(tcfg.seed + start)
    t0 = time.time()
    for epoch in range(start, tcfg.epochs):
        set_cosine_lr(opt, tcfg.lr, epoch, tcfg.epochs)
        net.train()
        order = rng.permutation(len(train))
        losses = []
        for i in range(0, len(order), tcfg.batch):
            batch = [train[j] for j in order[i : i + tcfg.batch]]
            pe, pe0 = update_and_error(net, batch, config, tcfg.n_points, rng)
            loss = torch.log((pe + 1.0) / (pe0 + 1.0)).mean() if tcfg.loss == "relative" else pe.mean()
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            losses.append(float(loss.detach()))
        val_pe = evaluate_level(net, val, config, tcfg.n_points)
        history.append({"epoch": epoch, "train_loss": float(np.mean(losses)), **val_pe})
        key = val_pe["val_log_ratio"] if tcfg.loss == "relative" else val_pe["val_pe_px"]
        if best is None or key < best["key"]:
            best = {"key": key, "epoch": epoch, "model": {k: v.clone() for k, v in net.state_dict().items()}}
        if checkpoint is not None:
            tmp = Path(checkpoint).with_suffix(".tmp")
            torch.save({"model": net.state_dict(), "optimizer": opt.state_dict(), "meta_json": json.dumps(meta),
                        "history_json": json.dumps(history), "best": best}, tmp)
            tmp.replace(checkpoint)
        if progress:
            _bar("  PPC-L", epoch + 1, tcfg.epochs, time.time() - t0, f"train loss {history[-1]['train_loss']:.3f}, val PE {val_pe['val_pe_px']:.1f} px "
                 f"(under 10 px: {val_pe['val_pe_small_before_px']:.1f} -> {val_pe['val_pe_small_after_px']:.1f})")
    if progress:
        print(file=sys.stderr)
    if best is not None:
        net.load_state_dict(best["model"])
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
