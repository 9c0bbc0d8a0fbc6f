"""PPC-L at run time: the correspondence weights learned through the PPC solver (conventions: :mod:`reg2d3d_ros.geometry`).

Following the PPC-L seed (``shared/seeds/ppc_l_correspondence_weighting.txt``): a small PointNet
(:class:`reg2d3d_ros.nets.CorrespondenceWeightNet`) maps per-correspondence features to weights in
``(0, 1)`` times a learned global factor. The weights enter the regularised least squares of the
PPC model (:func:`reg2d3d_ros.ppc.solver.solve_ppc`, the prior of
:func:`reg2d3d_ros.ppc.register.update_prior_precision` is the regulariser) and the resulting motion is applied to the start pose. The training objective is built on
the *projection error* of target points after that single update,

    PE = mean_i || pi(M(w) T_start x_i) - pi(T_gt x_i) ||   (pixels of the full-resolution frame),

either its mean (the seed's) or, by default, the mean of ``log((PE + 1) / (PE_start + 1))`` (see
:class:`.train.PPCLTrainConfig`); no per-correspondence labels are needed; correspondences are searched once per sample (NGC,
at the start pose) and stored (:mod:`.train`). One network per nominal resolution level.

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
from pathlib import Path

import torch

from ..engines import point_network_spec, register_format
from ..errors import ConfigError, ModelLoadError
from ..ppc.register import Correspondences

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
        from ..engines import read_model_blob
        from ..nets import CorrespondenceWeightNet

        blob = read_model_blob(path, FORMAT, VERSION, "PPC-L model", "train it with python -m reg2d3d_ros.ppcl.train")
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


def networks(path) -> dict:
    """``{"level_<k>": NetworkSpec}`` of a ``ppcl.pt`` (one point network per resolution level; :mod:`reg2d3d_ros.engines`)."""
    lw = LearnedWeighting.load(path)
    return {f"level_{k:g}": point_network_spec(f"level_{k:g}", lw.nets[k], N_FEATURES) for k in lw.levels}


register_format(FORMAT, networks)
