"""FlowNetC-style optical flow between the gradient images of an X-ray frame and of a projection.

The PPC Flow update operator (``shared/seeds/ppc_flow_attention_update_operator.txt``) predicts
the 2-D displacement ``dp`` that takes a projected contour point ``p`` of the current projection
(the *moving* image) to its position in the X-ray frame (the *fixed* image). Architecture
(FlowNetC, Dosovitskiy et al. 2015, reduced for CPU):

- a shared encoder (two stride-2 stages) applied to both gradient images ``(B, 2, H, W)``;
- a correlation layer at 1/4 resolution: for every displacement ``(dx, dy)`` within
  ``max_displacement`` feature cells, the cosine similarity of the moving features and the
  shifted fixed features, giving ``(2d + 1)^2`` cost channels;
- the costs, summed over a 3x3 neighbourhood of cells, give a *soft-argmax* flow (the
  expected displacement under a softmax over the displacements, learned temperature): a direct,
  parameter-light path from the correlation to the flow that makes the encoder learn matching
  features from the first steps (our addition to FlowNetC, for training on a CPU with little data);
- a decoder of dilated convolutions over the costs and the moving features adds a residual
  flow at 1/4 resolution; the sum is upsampled bilinearly (and scaled) to the input grid.

Input: fixed and moving gradient images ``(B, 2, H, W)`` float32 (H, W multiples of 4), each
normalised by its own gradient magnitude (:func:`normalise_gradients`). Output: ``(B, 2, H, W)``
flow ``(du, dv)`` in input pixels, moving -> fixed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def normalise_gradients(grad: torch.Tensor) -> torch.Tensor:
    """``(B, 2, H, W)`` gradients divided by the 99th percentile of their magnitude per image."""
    mag = torch.linalg.norm(grad, dim=1).flatten(1)
    scale = torch.quantile(mag, 0.99, dim=1).clamp_min(1e-8)
    return grad / scale[:, None, None, None]


def correlation(f1: torch.Tensor, f2: torch.Tensor, max_displacement: int) -> torch.Tensor:
    """Cost volume ``(B, (2d+1)^2, h, w)``: mean over channels of ``f1(x) f2(x + delta)``."""
    d = max_displacement
    B, C, h, w = f1.shape
    f2p = F.pad(f2, (d, d, d, d))
    out = []
    for dy in range(2 * d + 1):
        for dx in range(2 * d + 1):
            out.append((f1 * f2p[:, :, dy : dy + h, dx : dx + w]).mean(dim=1))
    return torch.stack(out, dim=1)


def _conv(a, b, stride=1, dilation=1):
    return nn.Sequential(nn.Conv2d(a, b, 3, stride=stride, padding=dilation, dilation=dilation), nn.LeakyReLU(0.1, inplace=True))


class FlowNetC(nn.Module):
    """Reduced FlowNetC.

    Parameters
    ----------
    width : int
        Channels of the encoder's last stage.
    max_displacement : int
        Correlation search radius in 1/4-resolution cells (4 cells = 16 input pixels).
    """

    def __init__(self, width: int = 32, max_displacement: int = 4):
        super().__init__()
        self.max_displacement = int(max_displacement)
        self.encoder = nn.Sequential(_conv(2, 16), _conv(16, 24, stride=2), _conv(24, width, stride=2), _conv(width, width))
        n_cost = (2 * max_displacement + 1) ** 2
        self.reduce = nn.Conv2d(width, 16, 1)
        self.decoder = nn.Sequential(
            _conv(n_cost + 16 + 2, 48), _conv(48, 48, dilation=2), _conv(48, 32, dilation=4), nn.Conv2d(32, 2, 3, padding=1),
        )
        nn.init.zeros_(self.decoder[-1].weight)
        nn.init.zeros_(self.decoder[-1].bias)
        #: log of the soft-argmax sharpness (costs are cosine similarities)
        self.log_beta = nn.Parameter(torch.tensor(2.3))
        d = self.max_displacement
        dy, dx = torch.meshgrid(torch.arange(-d, d + 1.0), torch.arange(-d, d + 1.0), indexing="ij")
        self.register_buffer("displacements", torch.stack([dx.reshape(-1), dy.reshape(-1)]), persistent=False)  # (2, (2d+1)^2) cells

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        """Flow ``(B, 2, H, W)`` in input pixels for gradient images ``(B, 2, H, W)``."""
        H, W = moving.shape[-2:]
        fm, ff = self.encoder(moving), self.encoder(fixed)
        # unit feature vectors: the costs are cosine similarities in [-1, 1] times 1/C
        cost = correlation(F.normalize(fm, dim=1), F.normalize(ff, dim=1), self.max_displacement) * fm.shape[1]
        pooled = F.avg_pool2d(cost, 3, stride=1, padding=1, count_include_pad=False)
        prob = torch.softmax(torch.exp(self.log_beta) * pooled, dim=1)  # (B, D, h, w)
        soft = torch.einsum("bdhw,cd->bchw", prob, self.displacements.to(prob.dtype))  # cells
        x = torch.cat([F.leaky_relu(cost, 0.1), self.reduce(fm), soft], dim=1)
        flow_q = soft + self.decoder(x)  # quarter-resolution pixels
        scale = torch.tensor([W / flow_q.shape[-1], H / flow_q.shape[-2]], dtype=flow_q.dtype, device=flow_q.device)
        return F.interpolate(flow_q, size=(H, W), mode="bilinear", align_corners=False) * scale[None, :, None, None]


def sample_flow(flow: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
    """Bilinear samples ``(B, N, 2)`` of a flow field ``(B, 2, H, W)`` at pixel positions ``uv`` ``(B, N, 2)``."""
    H, W = flow.shape[-2:]
    gx = 2.0 * uv[..., 0] / max(W - 1, 1) - 1.0
    gy = 2.0 * uv[..., 1] / max(H - 1, 1) - 1.0
    grid = torch.stack([gx, gy], dim=-1)[:, :, None, :].to(flow.dtype)
    return F.grid_sample(flow, grid, mode="bilinear", padding_mode="border", align_corners=True)[..., 0].transpose(1, 2)
