"""Differentiable image similarity metrics for intensity-based 2D/3D registration.

Every metric compares a batch of moving images (rendered DRRs) ``(B, H, W)`` with one fixed
image (the X-ray frame) ``(H, W)`` -- or a batch ``(B, H, W)`` of them -- and returns ``(B,)``
similarities in ``[-1, 1]``, higher is better, in the dtype and on the device of the moving
images (the fixed image is cast to them). Both images are attenuation-like (bright = bone, see
:func:`reg2d3d_ros.images.to_attenuation`); every metric here is invariant to a positive affine
change of either image's intensities, so the scale of a DRR does not matter. All are symmetric
in their two images and differentiable (autograd) with respect to both.

Metrics (:data:`METRICS`, chosen by name with :func:`get_metric`)
------------------------------------------------------------------
``ncc``
    Global normalised cross-correlation (Pearson correlation of the pixel values).
``gc``
    Gradient correlation: the mean of the NCCs of the column (``d/du``) and row (``d/dv``)
    Sobel gradient images (Penney et al., IEEE TMI 1998). Insensitive to low-frequency
    differences (soft tissue, scatter, the anatomy a region-of-interest DRR leaves out).
``mncc``
    Multi-scale NCC: the mean, over scales, of the mean local NCC over non-overlapping square
    patches (the image is split into ``g x g`` patches for each ``g`` of ``grid``; ``g = 1`` is
    the global NCC). Local NCC adapts to slowly varying contrast.

An optional ``mask`` (``(H, W)`` or ``(B, H, W)``, non-negative weights) restricts a metric to
part of the image (weighted moments; patches of ``mncc`` are weighted by their mask mass).

Degenerate inputs
-----------------
Where an image (or a patch) is constant -- its variance is zero or at most the float rounding
of its values (``(64 eps)^2`` times its mean square, ``eps`` the machine epsilon of the dtype) --
the correlation is 0: no NaN and finite gradients.
"""

from __future__ import annotations

import torch

from ..drr.gradients import image_gradients
from ..errors import ConfigError

#: An image or patch whose variance is at most ``(ROUNDING_FACTOR * eps)^2`` times its mean square
#: counts as constant (``eps``: machine epsilon of the dtype).
ROUNDING_FACTOR = 64.0


def _pair(moving: torch.Tensor, fixed) -> tuple:
    """Check shapes, cast ``fixed`` to ``moving``'s dtype and device, broadcast to ``(B, H, W)``."""
    if not torch.is_tensor(moving) or moving.ndim != 3:
        raise ConfigError(f"moving images must be a (B, H, W) tensor, got {getattr(moving, 'shape', type(moving))}")
    if not moving.is_floating_point():
        moving = moving.float()
    fixed = torch.as_tensor(fixed)
    if fixed.ndim == 2:
        fixed = fixed[None]
    if fixed.ndim != 3 or fixed.shape[-2:] != moving.shape[-2:] or fixed.shape[0] not in (1, moving.shape[0]):
        raise ConfigError(f"fixed image of shape {tuple(fixed.shape)} does not match the moving images {tuple(moving.shape)}")
    fixed = fixed.to(dtype=moving.dtype, device=moving.device).expand_as(moving)
    return moving, fixed


def _weights(mask, like: torch.Tensor):
    """``(B, H, W)`` non-negative weights from a mask ``(H, W)`` or ``(B, H, W)``; None stays None."""
    if mask is None:
        return None
    w = torch.as_tensor(mask).to(dtype=like.dtype, device=like.device)
    if w.ndim == 2:
        w = w[None]
    if w.ndim != 3 or w.shape[-2:] != like.shape[-2:] or w.shape[0] not in (1, like.shape[0]):
        raise ConfigError(f"mask of shape {tuple(w.shape)} does not match the images {tuple(like.shape)}")
    return w.clamp(min=0.0).expand_as(like)


def _ncc_flat(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    """Correlation over the last dimension of ``(..., N)`` tensors, optional weights ``(..., N)``.

    Two-pass (centred) moments, so a constant image gives exactly zero variance; the result is 0
    where either side is constant (see the module doc) or the weights sum to zero.
    """
    if w is None:
        mean = lambda t: t.mean(dim=-1)  # noqa: E731
    else:
        wsum = w.sum(dim=-1, keepdim=True)
        wn = w / torch.where(wsum > 0, wsum, torch.ones_like(wsum))
        mean = lambda t: (wn * t).sum(dim=-1)  # noqa: E731
    xc = x - mean(x)[..., None]
    yc = y - mean(y)[..., None]
    vx, vy, cov = mean(xc * xc), mean(yc * yc), mean(xc * yc)
    fi = torch.finfo(vx.dtype)
    rel = (ROUNDING_FACTOR * fi.eps) ** 2
    ok = (vx > rel * mean(x * x) + fi.tiny) & (vy > rel * mean(y * y) + fi.tiny)
    denom = torch.sqrt(torch.where(ok, vx * vy, torch.ones_like(vx)))
    return torch.where(ok, cov / denom, torch.zeros_like(cov)).clamp(-1.0, 1.0)


def ncc(moving: torch.Tensor, fixed, mask=None) -> torch.Tensor:
    """Global normalised cross-correlation.

    Parameters
    ----------
    moving : torch.Tensor
        ``(B, H, W)`` moving images (e.g. DRRs), float; gradients flow through them.
    fixed : torch.Tensor or np.ndarray
        ``(H, W)`` or ``(B, H, W)`` fixed image(s).
    mask : torch.Tensor or np.ndarray, optional
        ``(H, W)`` or ``(B, H, W)`` non-negative pixel weights.

    Returns
    -------
    torch.Tensor
        ``(B,)`` correlation in ``[-1, 1]`` (dtype and device of ``moving``).
    """
    x, y = _pair(moving, fixed)
    w = _weights(mask, x)
    B = x.shape[0]
    return _ncc_flat(x.reshape(B, -1), y.reshape(B, -1), None if w is None else w.reshape(B, -1))


def gradient_correlation(moving: torch.Tensor, fixed, mask=None) -> torch.Tensor:
    """Gradient correlation: mean NCC of the ``d/du`` and ``d/dv`` Sobel gradient images.

    Parameters
    ----------
    moving : torch.Tensor
        ``(B, H, W)`` moving images, float.
    fixed : torch.Tensor or np.ndarray
        ``(H, W)`` or ``(B, H, W)`` fixed image(s).
    mask : torch.Tensor or np.ndarray, optional
        ``(H, W)`` or ``(B, H, W)`` non-negative pixel weights.

    Returns
    -------
    torch.Tensor
        ``(B,)`` similarity in ``[-1, 1]``.
    """
    x, y = _pair(moving, fixed)
    w = _weights(mask, x)
    B = x.shape[0]
    gx = image_gradients(x).reshape(B, 2, -1)  # (B, 2, HW)
    gy = image_gradients(y).reshape(B, 2, -1)
    ww = None if w is None else w.reshape(B, 1, -1).expand_as(gx)
    return _ncc_flat(gx, gy, ww).mean(dim=-1)


def multiscale_ncc(moving: torch.Tensor, fixed, mask=None, grid: tuple = (1, 2, 4)) -> torch.Tensor:
    """Multi-scale NCC: mean over scales of the mean local NCC over non-overlapping patches.

    For each ``g`` of ``grid`` the image is cut into ``g x g`` patches of
    ``(H // g) x (W // g)`` pixels (the last ``H % g`` rows and ``W % g`` columns are left out)
    and the NCC of every patch pair is computed; a constant patch contributes 0.

    Parameters
    ----------
    moving : torch.Tensor
        ``(B, H, W)`` moving images, float.
    fixed : torch.Tensor or np.ndarray
        ``(H, W)`` or ``(B, H, W)`` fixed image(s).
    mask : torch.Tensor or np.ndarray, optional
        ``(H, W)`` or ``(B, H, W)`` non-negative pixel weights (patches are weighted by their
        mask mass within a scale).
    grid : tuple of int
        Patches per side for each scale; every entry must be in ``1 .. min(H, W) // 2`` (or 1).

    Returns
    -------
    torch.Tensor
        ``(B,)`` similarity in ``[-1, 1]``.
    """
    x, y = _pair(moving, fixed)
    w = _weights(mask, x)
    B, H, W = x.shape
    if len(grid) == 0:
        raise ConfigError("multiscale_ncc needs at least one scale in grid")
    scores = []
    for g in grid:
        g = int(g)
        if g < 1 or (g > 1 and min(H, W) // g < 2):
            raise ConfigError(f"grid entry {g} is invalid for {H}x{W} images (patches need at least 2x2 pixels)")
        ph, pw = H // g, W // g

        def patches(t):
            t = t[:, : g * ph, : g * pw].reshape(B, g, ph, g, pw)
            return t.permute(0, 1, 3, 2, 4).reshape(B, g * g, ph * pw)

        px, py = patches(x), patches(y)
        pww = None if w is None else patches(w)
        r = _ncc_flat(px, py, pww)  # (B, g*g)
        if pww is None:
            scores.append(r.mean(dim=-1))
        else:
            mass = pww.sum(dim=-1)
            total = mass.sum(dim=-1)
            scores.append((r * mass).sum(-1) / torch.where(total > 0, total, torch.ones_like(total)))
    return torch.stack(scores, dim=-1).mean(dim=-1)


#: Metrics by name: ``callable(moving (B, H, W), fixed (H, W), mask=None) -> (B,)``.
METRICS = {"ncc": ncc, "gc": gradient_correlation, "mncc": multiscale_ncc}


def get_metric(name: str):
    """The metric called ``name`` (a key of :data:`METRICS`); :class:`ConfigError` if unknown."""
    try:
        return METRICS[str(name).lower()]
    except KeyError:
        raise ConfigError(f"unknown similarity metric {name!r}; choose one of {', '.join(sorted(METRICS))}") from None
