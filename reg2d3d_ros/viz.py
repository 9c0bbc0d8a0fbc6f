"""Overlays: the X-ray frame with the CT's projected bone contours drawn at a pose.

The contours are the outlines of the projected bone region of the target structure: the bone
occupancy is ray-cast at the pose (:class:`~reg2d3d_ros.drr.DRRRenderer` on the structure's
mask), thresholded, and traced with OpenCV. Conventions: :mod:`reg2d3d_ros.geometry`.
"""

from __future__ import annotations

import numpy as np
import torch

#: BGR-free RGB colours used by overlays.
GREEN = (40, 220, 60)
RED = (230, 40, 40)
YELLOW = (240, 220, 40)


def to_display_u8(img: np.ndarray, lo_pct: float = 0.5, hi_pct: float = 99.5) -> np.ndarray:
    """Window an ``(H, W)`` image to uint8 by percentiles."""
    img = np.asarray(img, dtype=np.float32)
    lo, hi = np.percentile(img, [lo_pct, hi_pct])
    return (np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1) * 255).astype(np.uint8)


def projected_mask(mask_renderer, T_optical_from_ct: torch.Tensor, K: torch.Tensor, height: int, width: int, min_path_mm: float = 1.0) -> np.ndarray:
    """Boolean ``(H, W)`` image of rays crossing at least ``min_path_mm`` of the structure.

    ``mask_renderer`` is a :class:`~reg2d3d_ros.drr.DRRRenderer` whose ``mu`` is the
    structure's 0/1 mask, so its line integral is the path length inside it (mm).
    """
    with torch.no_grad():
        L = mask_renderer.render(T_optical_from_ct.to(torch.float64)[None], K.to(torch.float64), height, width).line_integral[0]
    return (L > min_path_mm).numpy()


def contours_of(mask: np.ndarray) -> list:
    """OpenCV contours (list of ``(M, 1, 2)`` int arrays, ``(u, v)``) of a boolean image."""
    import cv2

    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    return list(contours)


def draw_overlay(frame: np.ndarray, layers, thickness: int = 1) -> np.ndarray:
    """RGB ``(H, W, 3)`` uint8 overlay of contour layers on a grey frame.

    Parameters
    ----------
    frame : np.ndarray
        ``(H, W)`` attenuation-like image (bright = bone) or uint8.
    layers : sequence of (contours, rgb)
        Contours (from :func:`contours_of`) and their colour; later layers are drawn on top.
    """
    import cv2

    grey = frame if frame.dtype == np.uint8 else to_display_u8(frame)
    rgb = np.repeat(grey[..., None], 3, axis=-1).copy()
    for contours, color in layers:
        cv2.drawContours(rgb, contours, -1, tuple(int(c) for c in color), thickness, lineType=cv2.LINE_8)
    return rgb
