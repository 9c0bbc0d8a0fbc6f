"""Start positions for registration experiments with a prescribed initial mTRE.

Following van de Kraats et al. (TMI 2005), start positions are ground-truth poses perturbed by
random rigid motions whose initial mTRE is spread evenly over ``[0, max_mtre_mm]``: the k-th of
``n`` starts gets a target error drawn uniformly in the k-th of ``n`` equal sub-intervals
(stratified), a random direction of motion in the 6-D parameter space (rotation about the
target points' centroid, scaled by their radius of gyration so that rotations and translations
contribute comparably), and the magnitude along that direction found by bisection so that the
mTRE equals the target error.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import ConfigError
from ..geometry.se3 import se3_exp
from .metrics import mtre


def perturbation_about(xi: torch.Tensor, center_ct_mm: torch.Tensor) -> torch.Tensor:
    """``(..., 4, 4)`` motions ``Tr(c) exp(xi) Tr(-c)`` (CT frame) for twists ``(..., 6)`` (rad, mm)."""
    M = se3_exp(xi)
    R = M[..., :3, :3]
    c = center_ct_mm.to(xi.dtype)
    M[..., :3, 3] = M[..., :3, 3] + c - (R @ c[..., None])[..., 0]
    return M


def random_starts(
    T_gt: torch.Tensor,
    pts_ct_mm: torch.Tensor,
    n: int,
    max_mtre_mm: float = 30.0,
    min_mtre_mm: float = 0.0,
    seed: int = 0,
    max_rotation_deg: float = 45.0,
):
    """Perturbed start poses with initial mTRE spread evenly over ``[min, max]``.

    Parameters
    ----------
    T_gt : torch.Tensor
        ``(4, 4)`` ground-truth ``T_optical_from_ct``, mm.
    pts_ct_mm : torch.Tensor
        ``(N, 3)`` target points, CT frame, mm (define the mTRE and the rotation centre).
    n : int
        Number of starts.
    max_mtre_mm, min_mtre_mm : float
        Range of initial mTRE, mm.
    seed : int
        Random seed.
    max_rotation_deg : float
        Cap on the rotation angle of a perturbation (a direction that would need more gets its
        rotation part shrunk until it fits).

    Returns
    -------
    T_start : torch.Tensor
        ``(n, 4, 4)`` start poses (float64).
    initial_mtre : torch.Tensor
        ``(n,)`` their mTRE, mm (equal to the targets up to 1e-6 mm).
    """
    if n < 1 or max_mtre_mm <= min_mtre_mm:
        raise ConfigError("need n >= 1 and max_mtre_mm > min_mtre_mm")
    rng = np.random.default_rng(seed)
    T_gt = T_gt.to(torch.float64)
    pts = pts_ct_mm.to(torch.float64)
    c = pts.mean(dim=0)
    r_g = float(torch.sqrt(((pts - c) ** 2).sum(dim=-1).mean()))
    targets = min_mtre_mm + (np.arange(n) + rng.uniform(size=n)) / n * (max_mtre_mm - min_mtre_mm)
    rng.shuffle(targets)
    target = torch.from_numpy(targets)
    u = rng.normal(size=(n, 6))
    u[:, :3] /= max(r_g, 1e-6)  # radians per mm of displacement at the radius of gyration
    scale = torch.zeros(n, dtype=torch.float64)
    todo = np.ones(n, dtype=bool)
    for _ in range(30):  # directions whose rotation would exceed the cap get less rotation
        idx = np.nonzero(todo)[0]
        if len(idx) == 0:
            break
        uu = u[idx] / (np.linalg.norm(u[idx, :3], axis=1) * r_g + np.linalg.norm(u[idx, 3:], axis=1) + 1e-12)[:, None]
        u[idx] = uu
        d = torch.from_numpy(uu)

        def err(s_: torch.Tensor) -> torch.Tensor:
            return mtre(T_gt @ perturbation_about(s_[:, None] * d, c), T_gt, pts)

        tgt = target[idx]
        lo = torch.zeros(len(idx), dtype=torch.float64)
        hi = tgt.clamp(min=1e-3).clone()
        for _ in range(40):  # grow the bracket until it contains the target
            low = err(hi) < tgt
            if not bool(low.any()) or float(hi.max()) > 1e4:
                break
            hi = torch.where(low, hi * 2.0, hi)
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            below = err(mid) < tgt
            lo = torch.where(below, mid, lo)
            hi = torch.where(below, hi, mid)
        s_ = 0.5 * (lo + hi)
        rot_deg = np.degrees(np.linalg.norm(uu[:, :3], axis=1) * s_.numpy())
        ok = rot_deg <= max_rotation_deg
        scale[torch.from_numpy(idx[ok])] = s_[torch.from_numpy(ok)]
        todo[idx[ok]] = False
        bad = idx[~ok]
        u[bad, :3] *= (0.9 * max_rotation_deg / rot_deg[~ok])[:, None]
    if todo.any():
        raise ConfigError(f"could not draw start positions within {max_rotation_deg} deg for mTRE up to {max_mtre_mm} mm")
    direction = torch.from_numpy(u)
    T_start = T_gt @ perturbation_about(scale[:, None] * direction, c)
    return T_start, mtre(T_start, T_gt, pts)
