"""The point-to-plane correspondence (PPC) model and its weighted / robust solvers.

Model (Wang et al., TMI 2017), in the optical frame of the current pose estimate (source at
the origin, conventions: :mod:`reg2d3d_ros.geometry`):

- a contour point ``w`` with unit surface gradient ``g`` lies on the apparent contour (``g`` is
  perpendicular to the viewing ray ``r = w / |w|``); the contour's 3-D tangent is ``t = r x g``;
- its 2-D correspondence ``p'`` only tells where the contour is *across* the image contour: the
  true position of ``w`` can slide along the contour tangent and along the viewing ray. These
  unknown directions span the plane through the source containing the back-projection ray
  ``r'`` of ``p'`` and the tangent ``t``; its unit normal is ``n = (r' x t) / |r' x t|``;
- a rigid motion ``x -> c + R (x - c) + v`` about the points' centroid ``c`` must bring ``w`` onto
  that plane: ``n . (c + R (w - c) + v) = 0``. With the small-angle linearisation
  ``R ~ I + [omega]_x`` this is one linear equation per correspondence:

      ((w - c) x n) . omega + n . v = -n . w,        i.e.  a_i . dv = b_i,  dv = (omega, v).

  ``b_i`` is the signed distance (mm) of ``w`` from its plane.

Solvers: weighted, regularised least squares ``dv = (A^T W A + lambda I)^-1 A^T W b``
(differentiable in torch, batched) and the maximum correntropy criterion for regression (MCCR):
iteratively re-weighted least squares with Gaussian kernel weights ``exp(-e^2 / (2 sigma^2))``
on the residuals, which down-weights outlier correspondences.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..geometry.se3 import make_transform, so3_exp

#: Degrees of freedom order of ``dv``: rotation (rad) about optical x, y, z, then translation (mm).
DOF = ("rx", "ry", "rz", "tx", "ty", "tz")
#: Mask that freezes motion in depth (optical z translation), used first at the coarsest level.
NO_DEPTH = (True, True, True, True, True, False)
#: Mask of the in-plane motion only: rotation about the principal ray and image-plane translation.
IN_PLANE = (False, False, True, True, True, False)


@dataclass
class PPCSolution:
    """Result of a PPC solve.

    Attributes
    ----------
    dv : torch.Tensor
        ``(B, 6)`` motion ``(omega [rad], v [mm])`` about ``center``, optical frame.
    center : torch.Tensor
        ``(B, 3)`` centre of rotation (weighted centroid of the points), optical frame, mm.
    residual_mm : torch.Tensor
        ``(B, N)`` point-to-plane residuals after the motion (linear model), mm.
    weights : torch.Tensor
        ``(B, N)`` final weights used (for MCCR the kernel weights times the prior weights).
    """

    dv: torch.Tensor
    center: torch.Tensor
    residual_mm: torch.Tensor
    weights: torch.Tensor

    def transform(self) -> torch.Tensor:
        """``(B, 4, 4)`` motion ``M`` in the optical frame: ``T_new = M @ T_old``."""
        return motion_about(self.dv, self.center)


def motion_about(dv: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """``(B, 4, 4)`` rigid motions ``x -> c + R(omega) (x - c) + v`` for ``dv`` ``(B, 6)``, ``c`` ``(B, 3)``."""
    R = so3_exp(dv[..., :3])
    t = center + dv[..., 3:] - (R @ center[..., None])[..., 0]
    return make_transform(R, t)


def ppc_equations(w_opt: torch.Tensor, g_opt: torch.Tensor, uv_corr: torch.Tensor, K: torch.Tensor, center: torch.Tensor):
    """Rows ``A`` and right-hand sides ``b`` of the PPC equations.

    Parameters
    ----------
    w_opt : torch.Tensor
        ``(B, N, 3)`` contour points, optical frame, mm.
    g_opt : torch.Tensor
        ``(B, N, 3)`` unit surface gradients at them, optical frame.
    uv_corr : torch.Tensor
        ``(B, N, 2)`` corresponding image positions ``p'``, pixels.
    K : torch.Tensor
        ``(B, 3, 3)`` or ``(3, 3)`` intrinsics, pixels.
    center : torch.Tensor
        ``(B, 3)`` centre of rotation, optical frame, mm.

    Returns
    -------
    A : torch.Tensor
        ``(B, N, 6)`` rows ``[(w - c) x n, n]``.
    b : torch.Tensor
        ``(B, N)`` right-hand sides ``-n . w`` (mm).
    n : torch.Tensor
        ``(B, N, 3)`` unit plane normals.
    """
    r = w_opt / torch.linalg.norm(w_opt, dim=-1, keepdim=True)
    tangent = torch.linalg.cross(r, g_opt, dim=-1)
    ones = torch.ones_like(uv_corr[..., :1])
    K_inv = torch.linalg.inv(K)
    r_corr = torch.cat([uv_corr, ones], dim=-1) @ K_inv.transpose(-1, -2)
    n = torch.linalg.cross(r_corr, tangent, dim=-1)
    n = n / torch.linalg.norm(n, dim=-1, keepdim=True).clamp(min=1e-12)
    A = torch.cat([torch.linalg.cross(w_opt - center[:, None, :], n, dim=-1), n], dim=-1)
    b = -(n * w_opt).sum(dim=-1)
    return A, b, n


def weighted_centroid(w_opt: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``(B, 3)`` centroid of points ``(B, N, 3)`` with weights ``(B, N)`` (plain mean if all zero)."""
    s = weights.sum(dim=-1, keepdim=True)
    plain = w_opt.mean(dim=-2)
    wc = (weights[..., None] * w_opt).sum(dim=-2) / s.clamp(min=1e-12)
    return torch.where(s > 1e-12, wc, plain)


def solve_weighted(A: torch.Tensor, b: torch.Tensor, weights: torch.Tensor, lam=0.0, dof_mask=None, rhs_offset=None) -> torch.Tensor:
    """Weighted, regularised least squares ``(A^T W A + lambda I)^-1 (A^T W b + r)``.

    Parameters
    ----------
    A : torch.Tensor
        ``(B, N, 6)`` equation rows.
    b : torch.Tensor
        ``(B, N)`` right-hand sides.
    weights : torch.Tensor
        ``(B, N)`` non-negative weights.
    lam : float or torch.Tensor
        Regulariser weight: scalar, ``(B,)`` (times the identity) or ``(B, 6)`` / ``(6,)`` (a diagonal).
    dof_mask : sequence of 6 bool, optional
        False for degrees of freedom held at zero (e.g. :data:`NO_DEPTH`).
    rhs_offset : torch.Tensor, optional
        ``(B, 6)`` or ``(6,)`` term ``r`` added to the right-hand side (a prior's mean times its
        precision), default 0.

    Returns
    -------
    torch.Tensor
        ``(B, 6)`` motion parameters. Differentiable with respect to all inputs.
    """
    Aw = A * weights[..., None]
    H = Aw.transpose(-1, -2) @ A  # (B, 6, 6)
    rhs = (Aw * b[..., None]).sum(dim=-2)  # (B, 6)
    if rhs_offset is not None:
        rhs = rhs + rhs_offset.to(A.dtype)
    eye = torch.eye(6, dtype=A.dtype, device=A.device)
    lam_t = torch.as_tensor(lam, dtype=A.dtype, device=A.device)
    if lam_t.ndim >= 1 and lam_t.shape[-1] == 6:
        H = H + torch.diag_embed(lam_t.reshape(-1, 6))
    else:
        H = H + lam_t.reshape(-1, 1, 1) * eye
    if dof_mask is not None:
        m = torch.as_tensor(dof_mask, dtype=A.dtype, device=A.device)
        H = H * m[:, None] * m[None, :] + torch.diag(1.0 - m)
        rhs = rhs * m
    # a jitter at machine precision keeps rank-deficient systems (too few correspondences)
    # solvable without biasing weakly observed directions such as depth
    scale = H.diagonal(dim1=-2, dim2=-1).abs().amax(dim=-1).clamp(min=1e-12)
    H = H + 10.0 * torch.finfo(A.dtype).eps * scale[:, None, None] * eye
    return torch.linalg.solve(H, rhs[..., None])[..., 0]


def solve_ppc(
    w_opt: torch.Tensor,
    g_opt: torch.Tensor,
    uv_corr: torch.Tensor,
    K: torch.Tensor,
    weights: torch.Tensor | None = None,
    lam=0.0,
    dof_mask=None,
    robust: str = "none",
    mccr_iterations: int = 10,
    mccr_sigma_min_mm: float = 0.25,
    prior_precision: torch.Tensor | None = None,
    anchor_precision: torch.Tensor | None = None,
    anchor_offset: torch.Tensor | None = None,
) -> PPCSolution:
    """Solve the PPC model for the motion that brings contour points onto their planes.

    Parameters
    ----------
    w_opt, g_opt : torch.Tensor
        ``(B, N, 3)`` contour points (mm) and unit gradients, optical frame of the current pose.
    uv_corr : torch.Tensor
        ``(B, N, 2)`` correspondences, pixels.
    K : torch.Tensor
        ``(3, 3)`` or ``(B, 3, 3)`` intrinsics.
    weights : torch.Tensor, optional
        ``(B, N)`` prior weights (e.g. NGC scores, or learned); default all ones.
    lam : float or torch.Tensor
        Regulariser weight.
    dof_mask : sequence of 6 bool, optional
        Degrees of freedom allowed to move.
    robust : str
        ``none`` (one weighted solve) or ``mccr`` (maximum correntropy IRLS).
    mccr_iterations : int
        IRLS iterations for MCCR.
    mccr_sigma_min_mm : float
        Lower bound of the MCCR kernel width, mm.
    prior_precision : torch.Tensor, optional
        ``(6,)`` or ``(B, 6)`` diagonal added to ``A^T W A``: a zero-mean Gaussian prior on the
        update, ``sigma_noise^2 / sigma_prior^2`` per degree of freedom (MAP estimate). It keeps
        weakly observed directions (depth, out-of-plane rotation) from absorbing noise.
    anchor_precision, anchor_offset : torch.Tensor, optional
        ``(6,)``: a Gaussian prior on the *accumulated* motion since a reference pose (e.g. the
        start of the registration): with ``delta`` the current deviation from that pose (same
        parametrisation as ``dv``), the prior on ``delta + dv`` adds ``anchor_precision`` to the
        diagonal and ``-anchor_precision * delta`` to the right-hand side. Pass ``delta`` as
        ``anchor_offset``.
    """
    B, N, _ = w_opt.shape
    if weights is None:
        weights = torch.ones(B, N, dtype=w_opt.dtype, device=w_opt.device)
    center = weighted_centroid(w_opt, weights)
    A, b, _ = ppc_equations(w_opt, g_opt, uv_corr, K, center)
    rhs_offset = None
    if prior_precision is not None or anchor_precision is not None:
        lam = torch.as_tensor(lam, dtype=A.dtype, device=A.device).reshape(-1, 1) * torch.ones(6, dtype=A.dtype, device=A.device)
        if prior_precision is not None:
            lam = lam + prior_precision.to(A.dtype).reshape(-1, 6)
        if anchor_precision is not None:
            P = anchor_precision.to(A.dtype).reshape(-1, 6)
            lam = lam + P
            rhs_offset = -P * anchor_offset.to(A.dtype).reshape(-1, 6)
    dv = solve_weighted(A, b, weights, lam, dof_mask, rhs_offset)
    w_eff = weights
    if robust == "mccr":
        for _ in range(mccr_iterations):
            e = (A * dv[:, None, :]).sum(dim=-1) - b
            sigma = mccr_kernel_width(e, weights, mccr_sigma_min_mm)
            w_eff = weights * torch.exp(-(e * e) / (2.0 * sigma[:, None] ** 2))
            dv = solve_weighted(A, b, w_eff, lam, dof_mask, rhs_offset)
    elif robust != "none":
        raise ValueError(f"robust must be 'none' or 'mccr', got {robust!r}")
    residual = (A * dv[:, None, :]).sum(dim=-1) - b
    return PPCSolution(dv=dv, center=center, residual_mm=residual, weights=w_eff)


def mccr_kernel_width(e: torch.Tensor, weights: torch.Tensor, sigma_min: float, factor: float = 1.5) -> torch.Tensor:
    """Kernel width ``(B,)`` for MCCR from residuals ``(B, N)``.

    ``sigma = max(sigma_min, factor * 1.4826 * median |e|)`` over correspondences with positive
    weight: ``1.4826 * median |e|`` estimates the standard deviation of the inlier residuals
    even with many outliers, and ``factor = 1.5`` keeps inliers within 1.5 of those standard
    deviations at kernel weight >= 0.6 while residuals beyond 4 get less than 3 %.
    """
    out = []
    for eb, wb in zip(e.detach(), weights.detach()):
        r = eb[wb > 0].abs()
        scale = 1.4826 * r.median() if r.numel() else torch.zeros((), dtype=e.dtype, device=e.device)
        out.append(torch.clamp(factor * scale, min=sigma_min))
    return torch.stack(out)
