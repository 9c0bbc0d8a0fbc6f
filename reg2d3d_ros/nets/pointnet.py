"""Correspondence weighting PointNet of PPC-L (Schaffert et al.; see ``shared/seeds``).

A set of ``N`` correspondences, each described by ``F`` features, is mapped to ``N`` weights in
``(0, 1)`` times one learned global factor:

- a per-point MLP (shared weights, 1x1 convolutions) gives local descriptors;
- max pooling over the points gives a global descriptor, concatenated back to every point;
- a second per-point MLP and a *modified softsign* ``0.5 (x / (1 + |x|) + 1)`` give the weights.

The network processes any ``N`` (all correspondences at inference, a fixed number per sample in
training). Points marked invalid by a mask are excluded from the pooling and get weight 0.
Input ``(B, N, F)`` float32 features, optional ``(B, N)`` bool mask; output ``(B, N)`` weights.
"""

from __future__ import annotations

import torch
from torch import nn


def modified_softsign(x: torch.Tensor) -> torch.Tensor:
    """Softsign mapped to ``(0, 1)``: ``0.5 (x / (1 + |x|) + 1)``."""
    return 0.5 * (x / (1.0 + x.abs()) + 1.0)


def _mlp(sizes) -> nn.Sequential:
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Conv1d(a, b, 1), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class CorrespondenceWeightNet(nn.Module):
    """Modified PointNet that weights correspondences.

    Parameters
    ----------
    in_features : int
        Features per correspondence ``F``.
    local : sequence of int
        Widths of the per-point MLP before pooling.
    head : sequence of int
        Widths of the per-point MLP after concatenating the global descriptor (a last linear
        layer to one output follows).
    """

    def __init__(self, in_features: int, local=(32, 64), head=(64, 32)):
        super().__init__()
        self.in_features = int(in_features)
        self.local = _mlp((in_features, *local))
        self.head = _mlp((local[-1] * 2, *head))
        self.out = nn.Conv1d(head[-1], 1, 1)
        #: log of the global weighting factor (the strength of the data term against the prior)
        self.log_scale = nn.Parameter(torch.zeros(()))

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Weights ``(B, N)`` for features ``(B, N, F)`` (and an optional validity mask ``(B, N)``)."""
        x = features.transpose(1, 2)  # (B, F, N)
        loc = self.local(x)  # (B, C, N)
        if mask is not None:
            pooled = loc.masked_fill(~mask[:, None, :], float("-inf")).amax(dim=-1, keepdim=True)
            pooled = torch.where(torch.isfinite(pooled), pooled, torch.zeros_like(pooled))
        else:
            pooled = loc.amax(dim=-1, keepdim=True)
        y = self.head(torch.cat([loc, pooled.expand_as(loc)], dim=1))
        w = modified_softsign(self.out(y)[:, 0]) * torch.exp(self.log_scale)
        if mask is not None:
            w = w * mask.to(w.dtype)
        return w
