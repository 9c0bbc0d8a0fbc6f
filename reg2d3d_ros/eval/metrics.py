"""Registration error metrics (van de Kraats et al., TMI 2005) in batched torch.

Conventions: :mod:`reg2d3d_ros.geometry`. All distances are in mm unless a name says px.

- **mTRE**: mean 3-D distance between target points moved by the estimate and by the ground
  truth.
- **mRPD** (mean reprojection distance): for each target point, the distance between its true
  position and the line from the X-ray source through its position under the estimate (the
  back-projection ray of its estimated projection). A pure error along that ray is invisible in
  the image and costs nothing.
- **PE** (projection error): mean 2-D distance of the projections, pixels (mm at the detector by
  multiplying with the pixel spacing).
- **SR** (success rate): fraction of registrations with final error below a threshold (2 mm
  mRPD; 10 mm for the *gross* success rate GSR).
- **CR** (capture range): the largest initial error ``e`` such that every bin of initial mTRE
  ``[0, bin), [bin, 2 bin), ...`` below ``e`` has a success rate of at least 95 %.
"""

from __future__ import annotations

import numpy as np
import torch

from ..geometry.camera import project_points
from ..geometry.se3 import transform_points


def mtre(T_est: torch.Tensor, T_gt: torch.Tensor, pts_ct_mm: torch.Tensor) -> torch.Tensor:
    """Mean target registration error.

    Parameters
    ----------
    T_est, T_gt : torch.Tensor
        ``(..., 4, 4)`` ``T_optical_from_ct`` estimates and ground truths, mm.
    pts_ct_mm : torch.Tensor
        ``(N, 3)`` or ``(..., N, 3)`` target points, CT frame, mm.

    Returns
    -------
    torch.Tensor
        ``(...)`` mTRE in mm.
    """
    d = transform_points(T_est, pts_ct_mm) - transform_points(T_gt, pts_ct_mm)
    return torch.linalg.norm(d, dim=-1).mean(dim=-1)


def mrpd(T_est: torch.Tensor, T_gt: torch.Tensor, pts_ct_mm: torch.Tensor) -> torch.Tensor:
    """Mean reprojection distance (distance of true points to estimated back-projection rays).

    Parameters
    ----------
    T_est, T_gt : torch.Tensor
        ``(..., 4, 4)`` ``T_optical_from_ct``, mm.
    pts_ct_mm : torch.Tensor
        ``(N, 3)`` or ``(..., N, 3)`` target points, CT frame, mm.

    Returns
    -------
    torch.Tensor
        ``(...)`` mRPD in mm.
    """
    p_est = transform_points(T_est, pts_ct_mm)  # optical frame: the source is the origin
    p_gt = transform_points(T_gt, pts_ct_mm)
    u = p_est / torch.linalg.norm(p_est, dim=-1, keepdim=True)
    along = (p_gt * u).sum(dim=-1, keepdim=True)
    return torch.linalg.norm(p_gt - along * u, dim=-1).mean(dim=-1)


def projection_error_px(T_est: torch.Tensor, T_gt: torch.Tensor, pts_ct_mm: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """Mean 2-D projection error in pixels.

    Parameters
    ----------
    T_est, T_gt : torch.Tensor
        ``(..., 4, 4)`` poses, mm.
    pts_ct_mm : torch.Tensor
        ``(N, 3)`` target points, CT frame, mm.
    K : torch.Tensor
        ``(3, 3)`` or ``(..., 3, 3)`` intrinsics, pixels.

    Returns
    -------
    torch.Tensor
        ``(...)`` mean projection error, pixels.
    """
    uv_e, _ = project_points(K, T_est, pts_ct_mm)
    uv_g, _ = project_points(K, T_gt, pts_ct_mm)
    return torch.linalg.norm(uv_e - uv_g, dim=-1).mean(dim=-1)


def capture_range(initial_mm, success, bin_mm: float = 1.0, required: float = 0.95, max_mm: float | None = None) -> float:
    """Capture range: the largest ``e`` with success rate >= ``required`` in every bin below ``e``.

    Parameters
    ----------
    initial_mm : array-like
        ``(M,)`` initial errors (mTRE), mm.
    success : array-like
        ``(M,)`` bool, registration succeeded.
    bin_mm : float
        Bin width, mm.
    required : float
        Success rate a bin needs.
    max_mm : float, optional
        Upper end of the tested range (default: the largest initial error, rounded up).

    Returns
    -------
    float
        Capture range in mm (0 if the first bin already fails). Empty bins do not break it.
    """
    initial = np.asarray(initial_mm, dtype=np.float64)
    ok = np.asarray(success, dtype=bool)
    top = max_mm if max_mm is not None else float(np.ceil(initial.max() / bin_mm) * bin_mm) if len(initial) else 0.0
    edge = 0.0
    while edge < top - 1e-9:
        sel = (initial >= edge) & (initial < edge + bin_mm)
        if sel.any() and ok[sel].mean() < required:
            return edge
        edge += bin_mm
    return top


def summarize(initial_mtre_mm, final_mrpd_mm, iterations=None, seconds=None, success_mm: float = 2.0, gross_mm: float = 10.0, bin_mm: float = 1.0, max_mm: float | None = None) -> dict:
    """The seed's Table 1 row: mRPD mean +- std over successes, SR, CR, GSR, GCR, iterations, time.

    Parameters
    ----------
    initial_mtre_mm, final_mrpd_mm : array-like
        ``(M,)`` initial mTRE and final mRPD per registration, mm.
    iterations, seconds : array-like, optional
        ``(M,)`` iterations and wall time per registration.
    success_mm, gross_mm : float
        Success thresholds on the final mRPD (SR/CR and GSR/GCR).
    """
    init = np.asarray(initial_mtre_mm, dtype=np.float64)
    final = np.asarray(final_mrpd_mm, dtype=np.float64)
    final = np.where(np.isfinite(final), final, np.inf)
    ok = final < success_mm
    gross = final < gross_mm
    out = {
        "n": int(len(final)),
        "mrpd_mean_mm": float(final[ok].mean()) if ok.any() else float("nan"),
        "mrpd_std_mm": float(final[ok].std()) if ok.any() else float("nan"),
        "sr_percent": 100.0 * float(ok.mean()) if len(ok) else float("nan"),
        "cr_mm": capture_range(init, ok, bin_mm, max_mm=max_mm),
        "gsr_percent": 100.0 * float(gross.mean()) if len(gross) else float("nan"),
        "gcr_mm": capture_range(init, gross, bin_mm, max_mm=max_mm),
    }
    if iterations is not None:
        out["iterations_mean"] = float(np.mean(iterations))
    if seconds is not None:
        out["seconds_mean"] = float(np.mean(seconds))
    return out


def percentiles(x) -> dict:
    """25th/50th/95th percentiles ``{"p25", "p50", "p95"}`` (nearest rank; a case without a pose counts as ``inf``)."""
    a = np.sort(np.asarray(x, dtype=np.float64))
    return {f"p{q}": float(a[int(round(q / 100 * (len(a) - 1)))]) for q in (25, 50, 95)}
