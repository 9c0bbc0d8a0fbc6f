"""Image gradients and resampling of projection images (pixel conventions: :mod:`reg2d3d_ros.geometry`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def image_gradients(img: torch.Tensor) -> torch.Tensor:
    """Sobel gradients of images, in intensity units per pixel.

    Parameters
    ----------
    img : torch.Tensor
        ``(B, H, W)`` images, any float dtype.

    Returns
    -------
    torch.Tensor
        ``(B, 2, H, W)``: channel 0 is ``d/du`` (along columns), channel 1 ``d/dv`` (rows).
        Borders use replicate padding.
    """
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=img.dtype, device=img.device) / 8.0
    k = torch.stack([kx, kx.T])[:, None]  # (2, 1, 3, 3)
    x = F.pad(img[:, None], (1, 1, 1, 1), mode="replicate")
    return F.conv2d(x, k)


def downsample(img: torch.Tensor, factor: float) -> torch.Tensor:
    """Resize images by ``factor`` (< 1 shrinks) with area averaging (antialiased).

    The output size is ``round(H * factor), round(W * factor)``, consistent with
    :meth:`reg2d3d_ros.geometry.CArmIntrinsics.scaled`.

    Parameters
    ----------
    img : torch.Tensor
        ``(B, H, W)`` or ``(B, C, H, W)`` images.
    factor : float
        Resize factor.
    """
    squeeze = img.ndim == 3
    x = img[:, None] if squeeze else img
    h, w = x.shape[-2:]
    size = (max(1, int(round(h * factor))), max(1, int(round(w * factor))))
    if size == (h, w):
        out = x
    elif factor < 1:
        out = F.interpolate(x, size=size, mode="area")
    else:
        out = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return out[:, 0] if squeeze else out
