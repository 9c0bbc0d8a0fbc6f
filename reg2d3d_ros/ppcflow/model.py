"""PPC Flow and PPC Flow Attention at run time: a learned update operator around the PPC solver.

Following ``shared/seeds/ppc_flow_attention_update_operator.txt``: at the coarsest level a
FlowNetC-style network (:class:`reg2d3d_ros.nets.FlowNetC`) predicts the flow between the
gradient image of the current projection (moving) and of the X-ray frame (fixed); sampled at the
projected contour points ``p`` it gives the correspondences ``p' = p + dp``. *PPC Flow Attention*
adds a PointNet (:class:`reg2d3d_ros.nets.CorrespondenceWeightNet`) that weights them. The PPC
solver (:func:`reg2d3d_ros.ppc.solver.solve_ppc`, with the regulariser of
:func:`reg2d3d_ros.ppc.register.update_prior_precision`) is the known operator in between.
Training objectives (one update from a start pose; :mod:`.train`):

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
from pathlib import Path

import torch

from ..engines import NetworkSpec, point_network_spec, register_format
from ..errors import ModelLoadError
from ..ppc.contours import Contours
from ..ppc.register import Correspondences

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
        from ..engines import read_model_blob
        from ..nets import CorrespondenceWeightNet
        from ..nets.flownet import FlowNetC

        blob = read_model_blob(path, FORMAT, VERSION, "PPC Flow model", "train it with python -m reg2d3d_ros.ppcflow.train")
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


def networks(path) -> dict:
    """``{"flow": NetworkSpec, "attention": NetworkSpec}`` of a ``ppcflow.pt`` (``attention`` if trained; :mod:`reg2d3d_ros.engines`)."""
    op = FlowOperator.load(path)
    hw = (1, 2, 128, 128)
    out = {"flow": NetworkSpec("flow", op.flow_net.eval(), {"fixed": hw, "moving": hw}, {"fixed": "float32", "moving": "float32"}, ("flow",),
                               {"fixed": {0: "batch", 2: "height", 3: "width"}, "moving": {0: "batch", 2: "height", 3: "width"}})}
    if op.attention_net is not None:
        out["attention"] = point_network_spec("attention", op.attention_net, N_FEATURES)
    return out


register_format(FORMAT, networks)
