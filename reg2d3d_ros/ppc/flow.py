"""PPC Flow and PPC Flow Attention: a learned update operator around the PPC solver.

Following ``shared/seeds/ppc_flow_attention_update_operator.txt``: at the coarsest level a
FlowNetC-style network (:class:`reg2d3d_ros.nets.FlowNetC`) predicts the flow between the
gradient image of the current projection (moving) and of the X-ray frame (fixed); sampled at the
projected contour points ``p`` it gives the correspondences ``p' = p + dp``. *PPC Flow Attention*
adds a PointNet (:class:`reg2d3d_ros.nets.CorrespondenceWeightNet`) that weights them. The PPC
solver (:func:`.solver.solve_ppc`, with the regulariser of :func:`.register.update_prior_precision`)
is the known operator in between. Training objectives (one update from a start pose):

- ``flow``: average end-point error (EPE, pixels of the level) of ``dp`` at the contour points
  against the ground-truth flow ``pi(T_gt T_start^-1 w) - p`` (the *Flow* baseline; the PPC
  solve is applied only at test time);
- ``ppc_flow`` / ``ppc_flow_attention``: mTRE (mm, the target's points) after the solve plus
  the EPE.

Attention features (13, float32): ``(p - mean p) / (0.05 fx)`` (2), the 2-D normal (2),
``(w - mean w) / 30 mm`` (3), the unit 3-D gradient (3), ``dp . n``, ``|dp x n|`` and ``|dp|``
over the search range (3).

Model file ``ppcflow.pt``: ``{"format", "version", "meta_json", "flow", "attention"}`` (state
dicts; ``attention`` empty without attention), loaded with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, ModelLoadError
from .contours import Contours
from .register import Correspondences, PPCConfig, PPCRegistrator, _levels, update_prior_precision
from .solver import motion_about, solve_ppc

FORMAT = "reg2d3d_ros.ppcflow"
VERSION = 1
N_FEATURES = 13
KINDS = ("flow", "ppc_flow", "ppc_flow_attention")


def attention_features(uv: torch.Tensor, normal_2d: torch.Tensor, w_opt: torch.Tensor, g_opt: torch.Tensor, dp: torch.Tensor,
                       fx, search_px: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, N, 13)`` float32 attention features (module docstring) of batched correspondences.

    ``uv, normal_2d, dp``: ``(B, N, 2)`` pixels of the level; ``w_opt, g_opt``: ``(B, N, 3)`` optical
    frame (mm, unit); ``fx``: ``(B,)`` or scalar focal length of the level; ``mask``: ``(B, N)`` valid points.
    """
    m = torch.ones(uv.shape[:2], dtype=uv.dtype, device=uv.device) if mask is None else mask.to(uv.dtype)
    cnt = m.sum(dim=1, keepdim=True).clamp_min(1.0)[..., None]
    fx = torch.as_tensor(fx, dtype=uv.dtype, device=uv.device).reshape(-1, 1, 1)
    uv_rel = (uv - (uv * m[..., None]).sum(1, keepdim=True) / cnt) / (0.05 * fx)
    w_rel = (w_opt - (w_opt * m[..., None]).sum(1, keepdim=True) / cnt) / 30.0
    along = (dp * normal_2d).sum(-1, keepdim=True)
    across = (dp[..., :1] * normal_2d[..., 1:] - dp[..., 1:] * normal_2d[..., :1]).abs()
    mag = torch.linalg.norm(dp, dim=-1, keepdim=True)
    f = torch.cat([uv_rel, normal_2d, w_rel, g_opt, along / search_px, across / search_px, mag / search_px], dim=-1)
    return f.to(torch.float32)


class FlowOperator:
    """A trained PPC Flow (Attention) operator: flow network, optional attention network, metadata."""

    def __init__(self, flow_net, attention_net=None, meta: dict | None = None):
        self.flow_net = flow_net.eval()
        self.attention_net = None if attention_net is None else attention_net.eval()
        self.meta = meta or {}
        #: ``{"flow": Engine, "attention": Engine}`` that replace the PyTorch modules for inference (:meth:`attach_engines`)
        self.engines = {}

    def attach_engines(self, path, backend: str = "auto", device: str = "auto") -> list:
        """Run the networks of the model file ``path`` on an inference back-end (:func:`reg2d3d_ros.engines.load`); returns the engines."""
        from ..engines import load

        names = ["flow"] + ([] if self.attention_net is None else ["attention"])
        self.engines = {n: load(path, n, backend, device) for n in names}
        return list(self.engines.values())

    @property
    def kind(self) -> str:
        return self.meta.get("kind", "ppc_flow_attention" if self.attention_net is not None else "ppc_flow")

    def flow(self, grad_fixed: torch.Tensor, grad_moving: torch.Tensor) -> torch.Tensor:
        """Flow ``(1, 2, h, w)`` (level pixels) for gradient images ``(2, h, w)``; sizes are padded to multiples of 4."""
        from ..nets.flownet import normalise_gradients

        h, w = grad_moving.shape[-2:]
        ph, pw = (-h) % 4, (-w) % 4
        f = normalise_gradients(grad_fixed[None].float())
        m = normalise_gradients(grad_moving[None].float())
        if ph or pw:
            f = torch.nn.functional.pad(f, (0, pw, 0, ph))
            m = torch.nn.functional.pad(m, (0, pw, 0, ph))
        if "flow" in self.engines:
            return self.engines["flow"](f, m)[..., :h, :w]
        with torch.no_grad():
            return self.flow_net(f, m)[..., :h, :w]

    def matcher(self):
        """Callable ``(Contours, grad_fixed, grad_moving, K, search_px) -> Correspondences`` (see :meth:`PPCRegistrator.update`)."""
        from ..nets.flownet import sample_flow

        def match(c: Contours, grad_fixed, grad_moving, K, search_px) -> Correspondences:
            n = len(c)
            if n == 0:
                z = c.uv.new_zeros(0)
                return Correspondences(c, c.uv.clone(), z, z, z.bool(), K, search_px)
            dp = sample_flow(self.flow(grad_fixed, grad_moving), c.uv[None].float())[0].to(c.uv.dtype)
            return Correspondences(c, c.uv + dp, torch.ones(n, dtype=c.uv.dtype), (dp * c.normal_2d).sum(-1),
                                   torch.zeros(n, dtype=torch.bool), K, search_px)

        return match

    def weighter(self):
        """Callable ``Correspondences -> (N,) weights``: the attention network, or all ones."""

        def weigh(corr: Correspondences) -> torch.Tensor:
            c = corr.contours
            if self.attention_net is None:
                return torch.ones(len(c), dtype=corr.uv_corr.dtype)
            dp = corr.uv_corr - c.uv
            f = attention_features(c.uv[None], c.normal_2d[None], c.w_opt[None], c.g_opt[None], dp[None], float(corr.K[0, 0]), corr.search_px)
            if "attention" in self.engines:
                return self.engines["attention"](f, torch.ones(f.shape[:2], dtype=torch.bool))[0].to(corr.uv_corr.dtype)
            with torch.no_grad():
                return self.attention_net(f)[0].to(corr.uv_corr.dtype)

        return weigh

    def save(self, path) -> None:
        """Write ``ppcflow.pt`` (plain tensors and JSON)."""
        blob = {
            "format": FORMAT, "version": VERSION, "meta_json": json.dumps(self.meta),
            "flow": {k: v.detach().cpu().contiguous() for k, v in self.flow_net.state_dict().items()},
            "attention": {} if self.attention_net is None else {k: v.detach().cpu().contiguous() for k, v in self.attention_net.state_dict().items()},
        }
        torch.save(blob, Path(path))

    @classmethod
    def load(cls, path) -> "FlowOperator":
        """Load ``ppcflow.pt``; raises :class:`ModelLoadError` with the reason if it is unusable."""
        from ..nets import CorrespondenceWeightNet
        from ..nets.flownet import FlowNetC

        from ..engines import read_model_blob

        blob = read_model_blob(path, FORMAT, VERSION, "PPC Flow model", "train it with python -m reg2d3d_ros.train_ppcflow")
        try:
            meta = json.loads(blob["meta_json"])
            flow = FlowNetC(meta["width"], meta["max_displacement"])
            flow.load_state_dict(blob["flow"])
            att = None
            if blob["attention"]:
                att = CorrespondenceWeightNet(N_FEATURES, tuple(meta["local"]), tuple(meta["head"]))
                att.load_state_dict(blob["attention"])
        except Exception as exc:
            raise ModelLoadError(f"PPC Flow model {path} does not match the network ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
        return cls(flow, att, meta)


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
    from .learned import _bar, matching_checkpoint, set_cosine_lr

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
    history, start, best = [], 0, None
    ck = matching_checkpoint(checkpoint, meta)
    if ck is not None:
        flow_net.load_state_dict(ck["flow"])
        if att is not None:
            att.load_state_dict(ck["attention"])
        opt.load_state_dict(ck["optimizer"])
        history, best = json.loads(ck["history_json"]), ck["best"]
        start = len(history)
    rng = np.random.default_rng(tcfg.seed + start)
    t0 = time.time()
    for epoch in range(start, tcfg.epochs):
        set_cosine_lr(opt, tcfg.lr, epoch, tcfg.epochs)
        flow_net.train()
        if att is not None:
            att.train()
        order = rng.permutation(len(train))
        losses = []
        for i in range(0, len(order), tcfg.batch):
            r = forward_update(flow_net, att, [train[j] for j in order[i : i + tcfg.batch]], tcfg.n_points)
            if tcfg.kind == "flow":
                loss = r["epe_px"].mean()
            else:
                loss = r["mtre_mm"].mean() + tcfg.epe_weight * r["epe_px"].mean()
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 5.0)
            opt.step()
            losses.append(float(loss.detach()))
        ev = evaluate_flow(flow_net, att, val, tcfg.n_points)
        history.append({"epoch": epoch, "train_loss": float(np.mean(losses)), **ev})
        key = ev["val_epe_px"] if tcfg.kind == "flow" else ev["val_mtre_mm"]
        if best is None or key < best["key"]:
            best = {"key": key, "epoch": epoch, "flow": {k: v.clone() for k, v in flow_net.state_dict().items()},
                    "attention": {} if att is None else {k: v.clone() for k, v in att.state_dict().items()}}
        if checkpoint is not None:
            tmp = Path(checkpoint).with_suffix(".tmp")
            torch.save({"flow": flow_net.state_dict(), "attention": {} if att is None else att.state_dict(), "optimizer": opt.state_dict(),
                        "meta_json": json.dumps(meta), "history_json": json.dumps(history), "best": best}, tmp)
            tmp.replace(checkpoint)
        if progress:
            _bar(f"  {tcfg.kind}", epoch + 1, tcfg.epochs, time.time() - t0,
                 f"loss {history[-1]['train_loss']:.2f}, val mTRE {ev['val_mtre_mm']:.2f} mm, EPE {ev['val_epe_px']:.2f} px")
    if progress:
        import sys

        print(file=sys.stderr)
    flow_net.load_state_dict(best["flow"])
    if att is not None:
        att.load_state_dict(best["attention"])
    meta_out = {"kind": tcfg.kind, "width": tcfg.width, "max_displacement": tcfg.max_displacement, "local": list(tcfg.local),
                "head": list(tcfg.head), "best_epoch": best["epoch"]}
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
