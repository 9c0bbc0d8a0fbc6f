"""Direct pose regression (PoseNet-style), the baseline that scene coordinate regression beats.

The network maps an image to a pose ``T_optical_from_ct``: a continuous 6-D rotation (two
columns of ``R``, Gram-Schmidt, Zhou et al. 2019) and the position of a reference point (the
scene centre) in the optical frame, in units of ``scale_mm`` around ``(0, 0, depth_mm)``.
"""

from __future__ import annotations

import torch
from torch import nn

from .unet import conv_block


def rotation_from_6d(x: torch.Tensor) -> torch.Tensor:
    """``(B, 6)`` -> ``(B, 3, 3)`` rotation matrices (columns from Gram-Schmidt)."""
    a, b = x[:, :3], x[:, 3:]
    c1 = nn.functional.normalize(a, dim=1)
    c2 = nn.functional.normalize(b - (c1 * b).sum(1, keepdim=True) * c1, dim=1)
    c3 = torch.cross(c1, c2, dim=1)
    return torch.stack([c1, c2, c3], dim=2)


class PoseRegressionNet(nn.Module):
    """Convolutional encoder, global pooling and a fully connected pose head.

    Parameters
    ----------
    widths : sequence of int
        Encoder channels per level (the image is halved after each).
    center_ct_mm : sequence of 3 float
        Scene centre, CT frame, mm (the point whose optical position is regressed).
    depth_mm : float
        Nominal optical depth of the scene centre (source-to-isocentre distance), mm.
    scale_mm : float
        Unit of the regressed position, mm.

    Input ``(B, 1, H, W)``; output ``(B, 4, 4)`` float ``T_optical_from_ct`` in mm.
    """

    def __init__(self, widths=(16, 32, 64, 96, 128), center_ct_mm=(0.0, 0.0, 0.0), depth_mm: float = 680.0, scale_mm: float = 100.0):
        super().__init__()
        layers, c = [], 1
        for i, w in enumerate(widths):
            if i:
                layers.append(nn.MaxPool2d(2))
            layers.append(conv_block(c, w))
            c = w
        self.encoder = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(c, 256), nn.ReLU(inplace=True), nn.Linear(256, 9))
        self.register_buffer("center_ct_mm", torch.tensor(center_ct_mm, dtype=torch.float32))
        self.depth_mm = float(depth_mm)
        self.scale_mm = float(scale_mm)
        with torch.no_grad():  # start at the identity-like AP orientation, centre on the axis
            self.head[-1].weight.mul_(0.01)
            self.head[-1].bias.copy_(torch.tensor([1.0, 0, 0, 0, 1.0, 0, 0, 0, 0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 1, H, W)`` -> ``(B, 4, 4)`` poses, mm."""
        f = self.encoder(x).mean(dim=(-2, -1))
        out = self.head(f)
        R = rotation_from_6d(out[:, :6])
        p = out[:, 6:] * self.scale_mm + torch.tensor([0.0, 0.0, self.depth_mm], dtype=out.dtype, device=out.device)
        t = p - R @ self.center_ct_mm.to(out.dtype)
        T = torch.zeros(x.shape[0], 4, 4, dtype=out.dtype, device=out.device)
        T[:, :3, :3] = R
        T[:, :3, 3] = t
        T[:, 3, 3] = 1.0
        return T
