"""Losses of scene coordinate regression (Shrestha et al., MICCAI 2023, Eqs. 4 and 5).

The network predicts, per output pixel and for the entry and the exit point, a mean ``u``
(3 channels, network units, see :class:`~reg2d3d_ros.scr.data.SceneNormalisation`) and
``s = log sigma`` of an isotropic Gaussian. Channel layout of ``pred (B, 8, h, w)``:
``[u_entry (3), s_entry, u_exit (3), s_exit]``.

- where the ray hits bone: the Gaussian negative log likelihood
  ``0.5 |X - u|^2 / sigma^2 + 3 log sigma`` (the seed's Eq. 4 for a 3-D isotropic Gaussian);
- where it does not: ``1 / sigma`` (Eq. 5), which pushes the variance up so that thresholding
  ``log sigma`` separates pixels with scene coordinates from those without.

``log sigma`` is clamped to ``[LOG_SIGMA_MIN, LOG_SIGMA_MAX]`` for numerical safety.

An optional L1 term ``l1_weight * |X - u|_1`` on hit pixels (not in the seed) gives the means a
gradient that does not shrink with ``1 / sigma^2``: with the NLL alone, the means learn slowly
while the predicted variances are still large (early training, few CPU steps).
"""

from __future__ import annotations

import torch

LOG_SIGMA_MIN = -7.0
LOG_SIGMA_MAX = 5.0


def split_prediction(pred: torch.Tensor):
    """``(B, 8, h, w)`` -> ``(mean (B, 2, 3, h, w), log_sigma (B, 2, h, w))`` (entry, exit)."""
    B, C, h, w = pred.shape
    if C != 8:
        raise ValueError(f"expected 8 channels (entry/exit mean and log sigma), got {C}")
    p = pred.reshape(B, 2, 4, h, w)
    return p[:, :, :3], p[:, :, 3].clamp(LOG_SIGMA_MIN, LOG_SIGMA_MAX)


def scr_loss(pred: torch.Tensor, coords: torch.Tensor, hit: torch.Tensor, nonhit_weight: float = 1.0, l1_weight: float = 0.0) -> dict:
    """Scene coordinate loss.

    Parameters
    ----------
    pred : torch.Tensor
        ``(B, 8, h, w)`` network output.
    coords : torch.Tensor
        ``(B, 6, h, w)`` ground-truth entry and exit coordinates, network units (any value where
        ``hit`` is 0).
    hit : torch.Tensor
        ``(B, 1, h, w)`` 1 where the ray crosses bone, else 0.
    nonhit_weight : float
        Weight of the non-existent term.
    l1_weight : float
        Weight of the L1 term on the means of hit pixels (0: the seed's loss).

    Returns
    -------
    dict
        ``loss`` (scalar to minimise), ``nll`` (mean over hit pixels), ``nonhit`` (mean over
        the others), ``err`` (mean ``|X - u|`` over hit pixels, network units).
    """
    mean, s = split_prediction(pred)
    B, _, h, w = pred.shape
    X = coords.reshape(B, 2, 3, h, w)
    m = hit.to(pred.dtype).expand(B, 2, h, w)
    sq = (X - mean).square().sum(dim=2)  # (B, 2, h, w)
    nll = 0.5 * sq * torch.exp(-2.0 * s) + 3.0 * s
    nonhit = torch.exp(-s)
    n_hit = m.sum().clamp_min(1.0)
    n_non = (1.0 - m).sum().clamp_min(1.0)
    nll_mean = (nll * m).sum() / n_hit
    non_mean = (nonhit * (1.0 - m)).sum() / n_non
    loss = (nll * m).sum() / m.numel() + nonhit_weight * (nonhit * (1.0 - m)).sum() / m.numel()
    if l1_weight:
        loss = loss + l1_weight * ((X - mean).abs().sum(dim=2) * m).sum() / m.numel()
    err = (sq.detach().clamp_min(0).sqrt() * m).sum() / n_hit
    return {"loss": loss, "nll": nll_mean, "nonhit": non_mean, "err": err}
