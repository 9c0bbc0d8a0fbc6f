"""The correlation-driven learned similarity at run time: the trained network used as a similarity metric.

Seed: ``shared/seeds/correlation_driven_similarity.txt``; network: :class:`reg2d3d_ros.nets.similarity.SimilarityNet`;
training (pose parameters, the gradient-approximation and decomposition losses): :mod:`.train`.

:class:`LearnedSimilarity` is a metric like those of :mod:`reg2d3d_ros.intensity.metrics` (``(moving (B, h, w), fixed
(h, w)) -> (B,)``, higher is better: ``1 - L_net``), differentiable with respect to the moving
images; :class:`~reg2d3d_ros.intensity.register.IntensityRegistrator` uses it for
``metric="learned"``. Both images are resized to the network's input size. Optimising a pose
needs gradients through the network, so it runs in PyTorch (ONNX Runtime and TensorRT give no
input gradients).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.nn import functional as F

from ..errors import ConfigError, ModelLoadError

FORMAT = "reg2d3d_ros.learned_similarity"
VERSION = 1


# -- the metric -----------------------------------------------------------------------------------
class LearnedSimilarity:
    """A trained :class:`~reg2d3d_ros.nets.similarity.SimilarityNet` used as a similarity metric.

    Parameters
    ----------
    net : SimilarityNet
        The network (put in eval mode).
    meta : dict
        Training metadata (saved with the model).
    """

    def __init__(self, net, meta: dict | None = None):
        self.net = net.eval()
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.meta = dict(meta or {})

    @property
    def input_size(self) -> int:
        """Side of the network's square input, pixels."""
        return self.net.input_size

    def to(self, device) -> "LearnedSimilarity":
        """Move the network to ``device``; returns self."""
        self.net.to(device)
        return self

    def _resize(self, img: torch.Tensor) -> torch.Tensor:
        s = self.input_size
        if tuple(img.shape[-2:]) == (s, s):
            return img
        mode = "area" if img.shape[-2] >= s and img.shape[-1] >= s else "bilinear"
        kw = {} if mode == "area" else {"align_corners": False}
        return F.interpolate(img, size=(s, s), mode=mode, **kw)

    def dissimilarity(self, moving: torch.Tensor, fixed) -> torch.Tensor:
        """``L_net`` ``(B,)`` (dtype of ``moving``) of moving ``(B, h, w)`` and fixed ``(h, w)`` or ``(B, h, w)`` images."""
        if not torch.is_tensor(moving) or moving.ndim != 3:
            raise ConfigError(f"moving images must be a (B, H, W) tensor, got {getattr(moving, 'shape', type(moving))}")
        fixed = torch.as_tensor(fixed).to(device=moving.device)
        fixed = fixed[None] if fixed.ndim == 2 else fixed
        if fixed.ndim != 3 or fixed.shape[-2:] != moving.shape[-2:] or fixed.shape[0] not in (1, moving.shape[0]):
            raise ConfigError(f"fixed image of shape {tuple(fixed.shape)} does not match the moving images {tuple(moving.shape)}")
        dev = next(self.net.parameters()).device
        dt = next(self.net.parameters()).dtype
        m = self._resize(moving[:, None].to(device=dev, dtype=dt))
        x = self._resize(fixed[:, None].to(device=dev, dtype=dt))
        return self.net(x, m).to(dtype=moving.dtype, device=moving.device)

    def __call__(self, moving: torch.Tensor, fixed, mask=None) -> torch.Tensor:
        """Similarity ``1 - L_net`` ``(B,)``; ``mask`` is accepted for the metric interface and ignored (the network sees the whole frame)."""
        return 1.0 - self.dissimilarity(moving, fixed)

    def save(self, path) -> None:
        """Write the model file (plain tensors and JSON, ``weights_only`` loadable)."""
        sd = {k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        torch.save({"format": FORMAT, "version": VERSION, "arch_json": json.dumps(self.net.arch), "meta_json": json.dumps(self.meta), "state_dict": sd}, Path(path))

    @classmethod
    def load(cls, path, device=None) -> "LearnedSimilarity":
        """Load a model file; raises :class:`ModelLoadError` with the reason if it is unusable."""
        from ..engines import read_model_blob
        from ..nets.similarity import SimilarityNet

        blob = read_model_blob(path, FORMAT, VERSION, "learned similarity model", "train it with python -m reg2d3d_ros.similarity.train")
        try:
            arch = json.loads(blob["arch_json"])
            net = SimilarityNet(**arch)
            net.load_state_dict(blob["state_dict"])
            meta = json.loads(blob["meta_json"])
        except Exception as exc:
            raise ModelLoadError(f"learned similarity model {path} does not match the network "
                                 f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})") from None
        out = cls(net, meta)
        return out.to(device) if device is not None else out
