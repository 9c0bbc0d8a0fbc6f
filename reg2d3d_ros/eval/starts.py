"""Start positions for registration experiments with a prescribed initial mTRE.

Following van de Kraats et al. (TMI 2005), start positions are ground-truth poses perturbed by
random rigid motions whose initial mTRE is spread evenly over ``[0, max_mtre_mm]``: the k-th of
``n`` starts gets a target error drawn uniformly in the k-th of ``n`` equal sub-intervals
(stratified); a rotation about the target points' centroid with a random axis and an angle
uniform in ``[0, max_rotation_deg]`` (15 degrees by default: an initial guess from the C-arm's
angles is centimetres off but rarely more than 10-15 degrees); and a translation in a random
direction whose length is found by bisection so that the mTRE equals the target error (if the
rotation alone exceeds the target, the rotation is shrunk instead and there is no translation).

:func:`seed_like_perturbations` draws starts like the learned similarity seed's test protocol (normal
rotations and translations about the target, kept where the target stays in view).
"""

from __future__ import annotations

import math

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
    max_rotation_deg: float = 15.0,
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
        Largest rotation angle of a perturbation (angles are uniform up to it).

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
    targets = min_mtre_mm + (np.arange(n) + rng.uniform(size=n)) / n * (max_mtre_mm - min_mtre_mm)
    rng.shuffle(targets)
    target = torch.from_numpy(targets)
    axis = rng.normal(size=(n, 3))
    axis /= np.linalg.norm(axis, axis=1, keepdims=True)
    angle = np.radians(rng.uniform(0.0, max_rotation_deg, size=n))
    tdir = rng.normal(size=(n, 3))
    tdir /= np.linalg.norm(tdir, axis=1, keepdims=True)
    rot = torch.from_numpy(axis * angle[:, None])
    tdir_t = torch.from_numpy(tdir)

    def err(r_vec: torch.Tensor, t_vec: torch.Tensor) -> torch.Tensor:
        return mtre(T_gt @ perturbation_about(torch.cat([r_vec, t_vec], dim=-1), c), T_gt, pts)

    # a rotation that alone exceeds the target error is shrunk (bisection on its angle)
    too_big = err(rot, torch.zeros_like(rot)) > target
    if bool(too_big.any()):
        lo = torch.zeros(int(too_big.sum()), dtype=torch.float64)
        hi = torch.ones_like(lo)
        r0 = rot[too_big]
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            below = err(mid[:, None] * r0, torch.zeros_like(r0)) < target[too_big]
            lo = torch.where(below, mid, lo)
            hi = torch.where(below, hi, mid)
        rot[too_big] = (0.5 * (lo + hi))[:, None] * r0
    # translation magnitude along its direction so that the mTRE equals the target
    lo = torch.zeros(n, dtype=torch.float64)
    hi = target.clamp(min=1e-3) * 2.0 + 1.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        below = err(rot, mid[:, None] * tdir_t) < target
        lo = torch.where(below, mid, lo)
        hi = torch.where(below, hi, mid)
    trans = (0.5 * (lo + hi))[:, None] * tdir_t
    trans[too_big] = 0.0
    T_start = T_gt @ perturbation_about(torch.cat([rot, trans], dim=-1), c)
    return T_start, mtre(T_start, T_gt, pts)


def seed_like_perturbations(T_gt: torch.Tensor, center_ct_mm: torch.Tensor, intrinsics, n: int, rng: np.random.Generator,
                            rot_sd_deg: float = 20.0, inplane_sd_mm: float = 30.0, depth_sd_mm: float = 60.0, truncate_sd: float = 2.0,
                            scale=None, fov_fraction: float = 0.8) -> tuple:
    """Perturbations drawn like the seed's test starts, kept where the target stays in view.

    Rotations ``N(0, rot_sd_deg)`` about each optical axis through the target's centre, in-plane
    translation ``N(0, inplane_sd_mm)``, depth ``N(0, depth_sd_mm)``, each truncated at
    ``truncate_sd`` standard deviations, times ``scale`` (a float or a callable ``rng -> float``
    drawn per pose; default 1); redrawn until the centre projects into the central
    ``fov_fraction`` of the frame.

    Parameters
    ----------
    T_gt : torch.Tensor
        ``(4, 4)`` true ``T_optical_from_ct``, mm.
    center_ct_mm : torch.Tensor
        ``(3,)`` target centre, CT frame, mm.
    intrinsics : CArmIntrinsics
        Camera of the frame.
    n : int
        Number of perturbations.
    rng : numpy.random.Generator
        Random source.

    Returns
    -------
    tuple
        ``xi`` ``(n, 6)`` float64 (rad, mm) and ``T`` ``(n, 4, 4)`` float64 poses ``P(xi) @ T_gt``.
    """
    from ..intensity.register import perturb_about

    T_gt = torch.as_tensor(T_gt, dtype=torch.float64)
    c = torch.as_tensor(center_ct_mm, dtype=torch.float64)
    c_opt = T_gt[:3, :3] @ c + T_gt[:3, 3]
    K = intrinsics.K(torch.float64)
    sd = np.array([math.radians(rot_sd_deg)] * 3 + [inplane_sd_mm, inplane_sd_mm, depth_sd_mm])
    lo, hi = 0.5 * (1 - fov_fraction), 0.5 * (1 + fov_fraction)
    xis, Ts = [], []
    tries = 0
    while len(xis) < n:
        tries += 1
        if tries > 1000 * max(1, n):
            raise ConfigError("could not draw perturbations that keep the target in the field of view")
        s = 1.0 if scale is None else (scale(rng) if callable(scale) else float(scale))
        xi = torch.as_tensor(np.clip(rng.standard_normal(6), -truncate_sd, truncate_sd) * sd * s, dtype=torch.float64)
        T = perturb_about(xi[None], c_opt[None])[0] @ T_gt
        p = T[:3, :3] @ c + T[:3, 3]
        if p[2] <= 0:
            continue
        u, v = float(K[0, 0] * p[0] / p[2] + K[0, 2]), float(K[1, 1] * p[1] / p[2] + K[1, 2])
        if lo * intrinsics.width <= u <= hi * intrinsics.width and lo * intrinsics.height <= v <= hi * intrinsics.height:
            xis.append(xi)
            Ts.append(T)
    if not xis:
        return torch.zeros(0, 6, dtype=torch.float64), torch.zeros(0, 4, 4, dtype=torch.float64)
    return torch.stack(xis), torch.stack(Ts)
