"""A compact U-Net for dense regression (scene coordinates and their uncertainty)."""

from __future__ import annotations

import torch
from torch import nn


def conv_block(c_in: int, c_out: int) -> nn.Sequential:
    """Two 3x3 convolutions with batch norm and ReLU."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """Encoder-decoder with skip connections.

    Parameters
    ----------
    in_channels, out_channels : int
        Input and output channels.
    widths : sequence of int
        Channels per level, finest first; the image is halved ``len(widths) - 1`` times after
        the stem, so ``H`` and ``W`` must be divisible by ``stride * 2 ** (len(widths) - 1)``.
    stride : int
        Stride of the stem convolution: the output grid is ``(H / stride, W / stride)``; output
        pixel ``(i, j)`` belongs to input pixel ``(stride * i + stride // 2, stride * j + stride // 2)``
        (for stride 2: the odd rows and columns).

    Input ``(B, in_channels, H, W)`` float; output ``(B, out_channels, H / stride, W / stride)``.
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 8, widths=(24, 48, 64, 96), stride: int = 2):
        super().__init__()
        widths = [int(w) for w in widths]
        self.widths = widths
        self.stride = int(stride)
        self.stem = nn.Identity() if self.stride == 1 else nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, stride=self.stride, padding=1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        self.down = nn.ModuleList()
        c = in_channels if self.stride == 1 else widths[0]
        for w in widths:
            self.down.append(conv_block(c, w))
            c = w
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ModuleList()
        self.fuse = nn.ModuleList()
        for w_skip in reversed(widths[:-1]):
            self.up.append(nn.ConvTranspose2d(c, w_skip, 2, stride=2))
            self.fuse.append(conv_block(2 * w_skip, w_skip))
            c = w_skip
        self.head = nn.Conv2d(c, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, H, W)`` -> ``(B, C_out, H / stride, W / stride)``."""
        x = self.stem(x)
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else self.pool(x))
            skips.append(x)
        x = skips.pop()
        for up, fuse in zip(self.up, self.fuse):
            x = up(x)
            x = fuse(torch.cat([x, skips.pop()], dim=1))
        return self.head(x)
