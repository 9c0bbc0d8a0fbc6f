"""Correlation-driven learned image similarity (``shared/seeds/correlation_driven_similarity.txt``).

The network compares a fixed image ``I_x`` (the X-ray frame) with a moving image ``I_m`` (the DRR
of the target at a pose) and returns a *dissimilarity* ``L_net`` per pair (lower = more alike).
It is Siamese: both images go through the same layers and meet only in squared feature
differences.

- **Shallow shared feature encoder (SFE)**: each image is standardised (zero mean, unit
  standard deviation over the image, so the intensity scale of a DRR does not matter), then two
  strided 3x3 convolutions give ``Phi_s`` ``(B, C, S/4, S/4)``.
- **Global-local feature decomposition (GLD)**:
  the *local* branch ``L`` is an invertible network (INN) of affine coupling blocks on
  ``Phi_s`` (half the channels are scaled and shifted by functions of the other half, halves
  swapped between blocks; :meth:`LocalINN.inverse` undoes it exactly);
  the *global* branch ``G`` average-pools ``Phi_s`` by 2, adds a learned position embedding and
  runs a transformer block (multi-head self-attention over all ``(S/8)^2`` tokens and an MLP),
  so every global feature sees the whole image.
  ``Phi_g = (G(Phi_s^x) - G(Phi_s^m))^2`` and ``Phi_l = (L(Phi_s^x) - L(Phi_s^m))^2``.
- **Similarity evaluation (SE)**: a per-branch head of 1x1 convolutions maps ``Phi_g`` and
  ``Phi_l`` to score maps ``Phi_g^s``, ``Phi_l^s``; the global map is upsampled to the local
  one's size and ``L_net = <sigma(Phi_g^s), sigma(Phi_l^s)>`` is the mean over pixels of the
  product of their sigmoids (the seed's inner product), in ``(0, 1)``.

The input size ``S`` is fixed by the position embedding (``input_size``, a multiple of 8); callers
resize (:class:`reg2d3d_ros.similarity.LearnedSimilarity`). Attention is written out with
``matmul`` and ``softmax`` so that the network is twice differentiable (the training loss is a
function of the gradient of ``L_net`` with respect to ``I_m``) on every device.

Inputs ``(B, 1, S, S)`` float32 (any float dtype; the network's parameters set the compute dtype),
batch first; outputs follow the input's device.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def standardise(img: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``(B, 1, H, W)`` images with zero mean and unit standard deviation each (constant images stay 0)."""
    mean = img.mean(dim=(-2, -1), keepdim=True)
    c = img - mean
    std = c.pow(2).mean(dim=(-2, -1), keepdim=True).add(eps * eps).sqrt()
    return c / std


class AffineCoupling(nn.Module):
    """One affine coupling block: ``y1 = x1``, ``y2 = x2 * exp(s(x1)) + t(x1)``, halves then swapped.

    ``s`` is bounded by ``tanh`` (log-scale in ``(-1, 1)``) and the block starts as the identity
    (last layer zero-initialised), so it is invertible and well conditioned.
    """

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.half = channels // 2
        rest = channels - self.half
        self.net = nn.Sequential(nn.Conv2d(self.half, hidden, 3, padding=1), nn.LeakyReLU(0.1), nn.Conv2d(hidden, 2 * rest, 3, padding=1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x[:, : self.half], x[:, self.half :]
        s, t = self.net(x1).chunk(2, dim=1)
        y2 = x2 * torch.exp(torch.tanh(s)) + t
        return torch.cat([y2, x1], dim=1)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """Exact inverse of :meth:`forward`."""
        rest = y.shape[1] - self.half
        y2, x1 = y[:, :rest], y[:, rest:]
        s, t = self.net(x1).chunk(2, dim=1)
        x2 = (y2 - t) * torch.exp(-torch.tanh(s))
        return torch.cat([x1, x2], dim=1)


class LocalINN(nn.Module):
    """Local branch ``L``: a chain of :class:`AffineCoupling` blocks (same size in and out)."""

    def __init__(self, channels: int, hidden: int, blocks: int):
        super().__init__()
        self.blocks = nn.ModuleList([AffineCoupling(channels, hidden) for _ in range(blocks)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return x

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """Exact inverse of :meth:`forward`."""
        for b in reversed(self.blocks):
            y = b.inverse(y)
        return y


class GlobalAttention(nn.Module):
    """Global branch ``G``: 2x average pooling, learned position embedding, one transformer block.

    Parameters
    ----------
    channels : int
        Feature channels ``C`` (token width).
    grid : int
        Tokens per side after pooling (``S/8`` for input size ``S``).
    heads : int
        Attention heads (``C`` must be divisible by it).
    """

    def __init__(self, channels: int, grid: int, heads: int = 4):
        super().__init__()
        if channels % heads:
            raise ValueError(f"channels ({channels}) must be divisible by heads ({heads})")
        self.heads, self.grid = heads, grid
        self.pos = nn.Parameter(torch.zeros(1, grid * grid, channels))
        nn.init.normal_(self.pos, std=0.02)
        self.norm1 = nn.LayerNorm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)
        self.norm2 = nn.LayerNorm(channels)
        self.mlp = nn.Sequential(nn.Linear(channels, 2 * channels), nn.GELU(), nn.Linear(2 * channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, 2g, 2g)`` -> ``(B, C, g, g)``."""
        x = F.avg_pool2d(x, 2)
        B, C, h, w = x.shape
        tok = x.flatten(2).transpose(1, 2) + self.pos  # (B, N, C)
        q, k, v = self.qkv(self.norm1(tok)).reshape(B, h * w, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(C // self.heads), dim=-1)
        tok = tok + self.proj((att @ v).transpose(1, 2).reshape(B, h * w, C))
        tok = tok + self.mlp(self.norm2(tok))
        return tok.transpose(1, 2).reshape(B, C, h, w)


def _head(channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(channels, channels, 1), nn.LeakyReLU(0.1), nn.Conv2d(channels, 1, 1))


class SimilarityNet(nn.Module):
    """The learned dissimilarity ``L_net(I_x, I_m)`` (module doc).

    Parameters
    ----------
    input_size : int
        Side ``S`` of the square input images, pixels (multiple of 8).
    channels : int
        Feature channels ``C`` of the shared encoder and both branches.
    coupling_blocks : int
        Affine coupling blocks of the local INN.
    heads : int
        Attention heads of the global branch.
    """

    def __init__(self, input_size: int = 128, channels: int = 24, coupling_blocks: int = 2, heads: int = 4):
        super().__init__()
        if input_size % 8:
            raise ValueError(f"input_size must be a multiple of 8, got {input_size}")
        self.input_size = int(input_size)
        #: constructor arguments (saved with the model)
        self.arch = {"input_size": int(input_size), "channels": int(channels), "coupling_blocks": int(coupling_blocks), "heads": int(heads)}
        c = int(channels)
        self.encoder = nn.Sequential(nn.Conv2d(1, c // 2, 3, stride=2, padding=1), nn.LeakyReLU(0.1),
                                     nn.Conv2d(c // 2, c, 3, stride=2, padding=1), nn.LeakyReLU(0.1),
                                     nn.Conv2d(c, c, 3, padding=1))
        self.local = LocalINN(c, c, coupling_blocks)
        self.glob = GlobalAttention(c, input_size // 8, heads)
        self.head_local = _head(c)
        self.head_global = _head(c)

    def features(self, img: torch.Tensor) -> tuple:
        """``(Phi_s, L(Phi_s), G(Phi_s))`` of ``(B, 1, S, S)`` images: ``(B, C, S/4, S/4)`` twice and ``(B, C, S/8, S/8)``."""
        if img.ndim != 4 or img.shape[1] != 1 or tuple(img.shape[-2:]) != (self.input_size, self.input_size):
            raise ValueError(f"images must be (B, 1, {self.input_size}, {self.input_size}), got {tuple(img.shape)}")
        phi = self.encoder(standardise(img))
        return phi, self.local(phi), self.glob(phi)

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor, return_features: bool = False):
        """Dissimilarity ``(B,)`` of fixed ``(B or 1, 1, S, S)`` and moving ``(B, 1, S, S)`` images.

        With ``return_features`` also a dict of the branch features of both images
        (``local_x, local_m`` ``(B, C, S/4, S/4)``, ``global_x, global_m`` ``(B, C, S/8, S/8)``).
        """
        dt = self.head_local[0].weight.dtype
        fixed, moving = fixed.to(dt), moving.to(dt)
        if fixed.shape[0] == 1 and moving.shape[0] > 1:
            _, lx, gx = self.features(fixed)
            lx, gx = lx.expand(moving.shape[0], -1, -1, -1), gx.expand(moving.shape[0], -1, -1, -1)
        else:
            _, lx, gx = self.features(fixed)
        _, lm, gm = self.features(moving)
        s_l = self.head_local((lx - lm) ** 2)
        s_g = F.interpolate(self.head_global((gx - gm) ** 2), size=s_l.shape[-2:], mode="bilinear", align_corners=False)
        l_net = (torch.sigmoid(s_g) * torch.sigmoid(s_l)).mean(dim=(1, 2, 3))
        if return_features:
            return l_net, {"local_x": lx, "local_m": lm, "global_x": gx, "global_m": gm}
        return l_net
