"""2-D correspondence search by normalised gradient correlation (NGC) along contour normals.

For every projected contour point ``p`` with image normal ``n`` (pixels), a template patch of
the *moving* gradient image (the projection of the CT at the current pose) is compared with
patches of the *fixed* gradient image (the X-ray frame) centred at ``p + s n`` for integer
shifts ``s`` in ``[-S, S]``. Patches are ``(2h+1) x (2h+1)`` samples on a grid aligned with the
contour (along ``n`` and its tangent; optionally longer along the tangent), bilinearly
interpolated. The score is the NGC, the mean
over the two gradient components of their normalised cross-correlation; the best shift is
refined to sub-pixel precision by a parabola through its neighbours. Output ``p' = p + s* n``.
By default the correlation is computed jointly over both gradient components (see ``joint``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..drr.gradients import image_gradients


def gradient_image(img: torch.Tensor, smooth_sigma_px: float = 1.0) -> torch.Tensor:
    """Smoothed Sobel gradient ``(2, H, W)`` of an image ``(H, W)``."""
    x = img[None]
    if smooth_sigma_px > 0:
        r = max(1, int(round(3 * smooth_sigma_px)))
        k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=img.dtype, device=img.device) / smooth_sigma_px) ** 2)
        k = k / k.sum()
        x = F.pad(x[:, None], (r, r, 0, 0), mode="replicate")
        x = F.conv2d(x, k.view(1, 1, 1, -1))
        x = F.pad(x, (0, 0, r, r), mode="replicate")
        x = F.conv2d(x, k.view(1, 1, -1, 1))[:, 0]
    return image_gradients(x)[0]


def _sample(grad: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
    """Bilinear samples ``(2, *uv.shape[:-1])`` of ``grad`` ``(2, H, W)`` at pixel positions ``uv`` ``(..., 2)``."""
    H, W = grad.shape[-2:]
    shape = uv.shape[:-1]
    flat = uv.reshape(1, 1, -1, 2)
    gx = 2.0 * flat[..., 0] / max(W - 1, 1) - 1.0
    gy = 2.0 * flat[..., 1] / max(H - 1, 1) - 1.0
    out = F.grid_sample(grad[None].to(uv.dtype), torch.stack([gx, gy], dim=-1), mode="bilinear", padding_mode="border", align_corners=True)
    return out[0, :, 0].reshape(2, *shape)


def ngc_search(
    grad_fixed: torch.Tensor,
    grad_moving: torch.Tensor,
    uv: torch.Tensor,
    normal_2d: torch.Tensor,
    search_px: int = 8,
    patch_half: int = 2,
    patch_half_along: int | None = None,
    joint: bool = True,
):
    """Correspondences of contour points by NGC patch matching along their normals.

    Parameters
    ----------
    grad_fixed : torch.Tensor
        ``(2, H, W)`` gradient of the X-ray frame (``d/du``, ``d/dv``).
    grad_moving : torch.Tensor
        ``(2, H, W)`` gradient of the projection at the current pose.
    uv : torch.Tensor
        ``(N, 2)`` projected contour points, pixels.
    normal_2d : torch.Tensor
        ``(N, 2)`` unit image normals.
    search_px : int
        Largest shift searched, pixels (both directions).
    patch_half : int
        Patch half-size across the contour (along the normal), pixels.
    patch_half_along : int, optional
        Patch half-size along the contour (tangent); default ``patch_half``. Elongated patches
        follow the contour and reject clutter edges of other orientations.
    joint : bool
        True: one normalised correlation of the two-component gradient patches (each component
        weighted by its energy); False: the mean of the per-component NCCs (Wang et al.'s NGC).

    Returns
    -------
    uv_corr : torch.Tensor
        ``(N, 2)`` correspondences ``p'``, pixels.
    score : torch.Tensor
        ``(N,)`` NGC at the best shift, in ``[-1, 1]`` (0 where a patch has no texture).
    shift_px : torch.Tensor
        ``(N,)`` signed sub-pixel shift along the normal.
    at_limit : torch.Tensor
        ``(N,)`` bool: the best shift is at the end of the search range (the true peak may lie
        beyond it; such matches are ambiguous and usually rejected).
    """
    N = uv.shape[0]
    if N == 0:
        z = uv.new_zeros(0)
        return uv.clone(), z, z, z.bool()
    dt = uv.dtype
    tangent = torch.stack([-normal_2d[:, 1], normal_2d[:, 0]], dim=-1)
    along = patch_half if patch_half_along is None else patch_half_along
    o_n = torch.arange(-patch_half, patch_half + 1, dtype=dt, device=uv.device)
    o_t = torch.arange(-along, along + 1, dtype=dt, device=uv.device)
    a, b = torch.meshgrid(o_n, o_t, indexing="ij")  # a along the normal, b along the tangent
    offsets = a.reshape(-1, 1, 1) * normal_2d[None] + b.reshape(-1, 1, 1) * tangent[None]  # (P, N, 2)
    offsets = offsets.permute(1, 0, 2)  # (N, P, 2)
    template = _sample(grad_moving, uv[:, None, :] + offsets)  # (2, N, P)
    shifts = torch.arange(-search_px, search_px + 1, dtype=dt, device=uv.device)  # (S,)
    centers = uv[:, None, :] + shifts[None, :, None] * normal_2d[:, None, :]  # (N, S, 2)
    cand = _sample(grad_fixed, centers[:, :, None, :] + offsets[:, None, :, :])  # (2, N, S, P)

    def zmean(x, dim):
        return x - x.mean(dim=dim, keepdim=True)

    t0 = zmean(template, -1)[:, :, None, :]  # (2, N, 1, P)
    c0 = zmean(cand, -1)  # (2, N, S, P)
    num = (t0 * c0).sum(dim=-1)  # (2, N, S)
    tt = (t0 * t0).sum(dim=-1)
    cc = (c0 * c0).sum(dim=-1)
    if joint:
        num, tt, cc = num.sum(dim=0), tt.sum(dim=0), cc.sum(dim=0)
        den = torch.sqrt(tt * cc)
        ngc = torch.where(den > 1e-12, num / den.clamp(min=1e-12), torch.zeros_like(num))  # (N, S)
    else:
        den = torch.sqrt(tt * cc)
        ncc = torch.where(den > 1e-12, num / den.clamp(min=1e-12), torch.zeros_like(num))  # (2, N, S)
        ngc = ncc.mean(dim=0)  # (N, S)
    best = torch.argmax(ngc, dim=-1)
    rows = torch.arange(N, device=uv.device)
    score = ngc[rows, best]
    # sub-pixel: parabola through best-1, best, best+1
    lo = (best - 1).clamp(min=0)
    hi = (best + 1).clamp(max=len(shifts) - 1)
    y0, y1, y2 = ngc[rows, lo], score, ngc[rows, hi]
    denom = y0 - 2 * y1 + y2
    frac = torch.where((best > 0) & (best < len(shifts) - 1) & (denom < -1e-12), 0.5 * (y0 - y2) / denom, torch.zeros_like(y1))
    shift = shifts[best] + frac.clamp(-0.5, 0.5)
    uv_corr = uv + shift[:, None] * normal_2d
    at_limit = (best == 0) | (best == len(shifts) - 1)
    return uv_corr, score, shift, at_limit

