"""Pose from scene coordinates: confident pixels, subsampling, OpenCV RANSAC PnP, refinement.

Each confident output pixel gives up to two 2-D/3-D correspondences (the entry and the exit
point lie on the same ray, which constrains depth). Pixels are kept where the predicted
``log sigma`` is below a threshold; if more remain than ``max_points``, the most confident are
kept after a spatially uniform thinning (a grid of cells, a few points per cell), so that RANSAC
runs on a few hundred correspondences instead of the whole image (the seed's 1.75 s per image
was dominated by RANSAC over all pixels). OpenCV's ``solvePnPRansac`` (EPnP hypotheses) finds
the inliers; ``solvePnPRefineLM`` refines the pose on them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class PnPResult:
    """Outcome of :func:`solve_pnp`.

    Attributes
    ----------
    T_optical_from_ct : torch.Tensor or None
        ``(4, 4)`` float64 pose, mm (None when PnP failed).
    n_points : int
        Correspondences given to RANSAC.
    n_inliers : int
        RANSAC inliers.
    inlier_fraction : float
        ``n_inliers / n_points``.
    reprojection_px : float
        Median reprojection error of the inliers after refinement, pixels.
    seconds : float
        Time of the PnP stage.
    """

    T_optical_from_ct: torch.Tensor | None
    n_points: int
    n_inliers: int
    inlier_fraction: float
    reprojection_px: float
    seconds: float


def select_correspondences(mean_ct_mm: torch.Tensor, log_sigma: torch.Tensor, uv_px: torch.Tensor, max_log_sigma: float,
                           max_points: int = 600, cell_px: float | None = None, seed: int = 0):
    """Pick confident, well-spread correspondences.

    Parameters
    ----------
    mean_ct_mm : torch.Tensor
        ``(2, h, w, 3)`` predicted entry/exit scene coordinates, CT frame, mm.
    log_sigma : torch.Tensor
        ``(2, h, w)`` predicted log standard deviation (network units).
    uv_px : torch.Tensor
        ``(h, w, 2)`` frame pixel coordinates ``(u, v)`` of the output pixels.
    max_log_sigma : float
        Keep predictions with ``log_sigma`` below this.
    max_points : int
        At most this many correspondences.
    cell_px : float, optional
        Thinning cell size in frame pixels (default: from the spread of the confident pixels).

    Returns
    -------
    (np.ndarray, np.ndarray, np.ndarray)
        ``pts_ct_mm (N, 3)`` float64, ``uv_px (N, 2)`` float64, ``log_sigma (N,)``.
    """
    keep = log_sigma < max_log_sigma  # (2, h, w)
    k, iy, ix = torch.nonzero(keep, as_tuple=True)
    pts = mean_ct_mm[k, iy, ix].double().cpu().numpy()
    uv = uv_px[iy, ix].double().cpu().numpy()
    ls = log_sigma[k, iy, ix].double().cpu().numpy()
    if len(pts) <= max_points:
        return pts, uv, ls
    # spatial thinning: per cell keep the most confident, round-robin over cells
    if cell_px is None:
        span = np.ptp(uv, axis=0).max() + 1.0
        cell_px = max(1.0, span / np.sqrt(max_points / 2.0))
    cells = np.floor(uv / cell_px).astype(np.int64)
    key = cells[:, 0] * 100003 + cells[:, 1]
    order = np.lexsort((ls, key))  # by cell, then confidence
    key_sorted = key[order]
    first = np.r_[0, np.flatnonzero(np.diff(key_sorted)) + 1]
    rank = np.arange(len(order)) - np.repeat(first, np.diff(np.r_[first, len(order)]))
    pick = order[np.lexsort((ls[order], rank))][:max_points]
    return pts[pick], uv[pick], ls[pick]


def solve_pnp(pts_ct_mm: np.ndarray, uv_px: np.ndarray, K: np.ndarray, reprojection_px: float = 4.0, iterations: int = 500,
              confidence: float = 0.999, seed: int = 0) -> PnPResult:
    """RANSAC PnP and Levenberg-Marquardt refinement on the inliers.

    Parameters
    ----------
    pts_ct_mm : np.ndarray
        ``(N, 3)`` CT points, mm.
    uv_px : np.ndarray
        ``(N, 2)`` their pixels ``(u, v)`` in the frame.
    K : np.ndarray
        ``(3, 3)`` frame intrinsics, pixels.
    reprojection_px : float
        RANSAC inlier threshold, frame pixels.
    iterations : int
        RANSAC iterations.

    Returns
    -------
    PnPResult
    """
    import cv2

    from ..geometry.se3 import make_transform

    t0 = time.perf_counter()
    n = len(pts_ct_mm)
    fail = PnPResult(None, n, 0, 0.0, float("inf"), 0.0)
    if n < 6:
        fail.seconds = time.perf_counter() - t0
        return fail
    obj = np.ascontiguousarray(pts_ct_mm, dtype=np.float64).reshape(-1, 1, 3)
    img = np.ascontiguousarray(uv_px, dtype=np.float64).reshape(-1, 1, 2)
    Km = np.asarray(K, dtype=np.float64)
    cv2.setRNGSeed(int(seed))
    ok, rvec, tvec, inl = cv2.solvePnPRansac(obj, img, Km, None, iterationsCount=int(iterations), reprojectionError=float(reprojection_px),
                                             confidence=float(confidence), flags=cv2.SOLVEPNP_EPNP)
    if not ok or inl is None or len(inl) < 6:
        fail.seconds = time.perf_counter() - t0
        return fail
    inl = inl.reshape(-1)
    rvec, tvec = cv2.solvePnPRefineLM(obj[inl], img[inl], Km, None, rvec, tvec)
    proj, _ = cv2.projectPoints(obj, rvec, tvec, Km, None)
    err = np.linalg.norm(proj.reshape(-1, 2) - img.reshape(-1, 2), axis=1)
    inl2 = err < reprojection_px
    R, _ = cv2.Rodrigues(rvec)
    T = make_transform(torch.from_numpy(R), torch.from_numpy(tvec.reshape(3)))
    if not bool(torch.isfinite(T).all()) or T[2, 3] <= 0:
        fail.seconds = time.perf_counter() - t0
        return fail
    return PnPResult(T, n, int(inl2.sum()), float(inl2.mean()), float(np.median(err[inl2])) if inl2.any() else float("inf"),
                     time.perf_counter() - t0)
