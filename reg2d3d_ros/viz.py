"""Overlays: an X-ray frame with the CT's projected bone outlines drawn at a pose.

What a user sees (the node's ``/registration/overlay``, the demo's pictures) is drawn here:

- the frame, contrast-normalised for display (:func:`contrast_normalise`: a percentile window
  taken in the central part of the field, then CLAHE), so that a dark, low-contrast frame or one
  with collimator shutters still shows the vertebra;
- the **outline of the target's projected silhouette** as connected contour lines
  (:class:`OutlineOverlay`): the boundary of the region of the image whose rays cross the
  target's labelled voxels. The pose-independent part (the corners of the structure's boundary
  voxels, CT mm) is computed once; per frame the points are projected, splatted into a mask at
  the frame size, the gaps between splats are closed (a kernel as wide as the projected voxel
  spacing) and the mask's external contour is traced (``cv2.findContours``) and drawn
  (``cv2.polylines``): about a millisecond at 256x256;
- optionally the neighbouring vertebrae, fainter; where a structure is cut by the edge of the
  volume it comes from (a crop around the target), the cut is not drawn as an outline;
- a small legend (:func:`draw_legend`): the node's state, its confidence and the latency.

Conventions (frames, pixel centres, ``K``): :mod:`reg2d3d_ros.geometry`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

#: RGB colours of the overlays.
GREEN = (60, 255, 60)
RED = (255, 60, 50)
YELLOW = (255, 220, 40)
#: Colour of the neighbouring vertebrae's outlines (drawn blended, :data:`NEIGHBOUR_ALPHA`).
NEIGHBOUR_RGB = (80, 180, 255)
NEIGHBOUR_ALPHA = 0.55
#: Colour of the state word in the legend.
STATE_RGB = {"tracking": GREEN, "initialising": YELLOW, "lost": RED, "waiting_for_ct": YELLOW}


# ---------------------------------------------------------------------------------------------
# the frame


def to_display_u8(img: np.ndarray, lo_pct: float = 0.5, hi_pct: float = 99.5) -> np.ndarray:
    """Window an ``(H, W)`` image to uint8 by percentiles of the whole image."""
    img = np.asarray(img, dtype=np.float32)
    lo, hi = np.percentile(img, [lo_pct, hi_pct])
    return (np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1) * 255).astype(np.uint8)


def contrast_normalise(image: np.ndarray, lo_pct: float = 1.0, hi_pct: float = 99.0, central: float = 0.5,
                       clahe_clip: float = 2.0) -> np.ndarray:
    """Display copy of a frame: percentile window of its central part, then CLAHE.

    Parameters
    ----------
    image : np.ndarray
        ``(H, W)`` frame, any real dtype (attenuation-like: bright = more material, as the
        pipeline's decoded frames are).
    lo_pct, hi_pct : float
        Window percentiles, taken over the central ``central`` fraction of the rows and columns
        (every second pixel): collimator shutters, the table edge and air at the border do not set
        the window, the anatomy around the target (at the centre of the view) does.
    central : float
        Side of the central region as a fraction of the image (1: the whole image).
    clahe_clip : float
        Clip limit of OpenCV's contrast-limited adaptive histogram equalisation (tiles of about
        64 pixels); 0 disables it.

    Returns
    -------
    np.ndarray
        ``(H, W)`` uint8.
    """
    import cv2

    img = np.asarray(image, dtype=np.float32)
    h, w = img.shape
    mh, mw = int(round(h * (1 - central) / 2)), int(round(w * (1 - central) / 2))
    region = img[mh:h - mh:2, mw:w - mw:2] if central < 1 else img[::2, ::2]
    region = region[np.isfinite(region)]
    lo, hi = np.percentile(region, [lo_pct, hi_pct]) if region.size else (0.0, 1.0)
    u8 = (np.clip((np.nan_to_num(img) - lo) / max(float(hi - lo), 1e-6), 0, 1) * 255).astype(np.uint8)
    if clahe_clip > 0:
        tiles = (max(1, round(w / 64)), max(1, round(h / 64)))
        u8 = cv2.createCLAHE(clipLimit=float(clahe_clip), tileGridSize=tiles).apply(u8)
    return u8


# ---------------------------------------------------------------------------------------------
# outlines


@dataclass
class OutlineLayer:
    """One structure to outline: the corners of its boundary voxels (pose-independent).

    Attributes
    ----------
    name : str
        Short name (``T8``), for legends.
    pts_ct_mm : np.ndarray
        ``(N, 3)`` corners of the structure's boundary voxels, CT mm (stored float32): the
        projection of the union of its voxel cubes is the region they span.
    cut_pts_ct_mm : np.ndarray
        ``(M, 3)`` corners (stored float32) of the voxels that lie on a face of the volume the structure
        was taken from (a crop): the outline is not drawn where these project (a cut, not an edge
        of the bone). ``(0, 3)`` when the structure lies inside the volume.
    spacing_mm : float
        Largest voxel spacing (the gaps between projected corners are closed at this size).
    rgb : tuple of int
        Line colour.
    alpha : float
        Opacity of the lines (1: opaque).
    """

    name: str
    pts_ct_mm: np.ndarray
    cut_pts_ct_mm: np.ndarray
    spacing_mm: float
    rgb: tuple = GREEN
    alpha: float = 1.0

    def __post_init__(self):
        # float32 copies for the per-frame projection (the arrays a user passed stay as they are)
        self.pts_ct_mm = np.ascontiguousarray(np.asarray(self.pts_ct_mm, dtype=np.float64).reshape(-1, 3), dtype=np.float32)
        self.cut_pts_ct_mm = np.ascontiguousarray(np.asarray(self.cut_pts_ct_mm, dtype=np.float64).reshape(-1, 3), dtype=np.float32)


def boundary_corner_points(mask: np.ndarray, T_ct_from_ijk: np.ndarray) -> tuple:
    """Corners of a mask's boundary voxels, and of those on the volume's faces, in CT mm.

    Parameters
    ----------
    mask : np.ndarray
        ``(D, H, W)`` bool, array order ``(k, j, i)``.
    T_ct_from_ijk : np.ndarray
        ``(4, 4)`` voxel index to CT mm affine.

    Returns
    -------
    (np.ndarray, np.ndarray)
        ``(N, 3)`` float64 corners of the voxels with a 6-neighbour outside the mask, and
        ``(M, 3)`` float64 corners of the mask voxels on a face of the volume (a structure cut by
        the volume's edge), both CT mm; corners are ``(i, j, k) +- 0.5``.
    """
    m = np.asarray(mask, dtype=bool)
    if not m.any():
        z = np.zeros((0, 3))
        return z, z
    kji = np.argwhere(m)
    lo = np.maximum(kji.min(axis=0) - 1, 0)
    hi = kji.max(axis=0) + 2
    sub = m[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    pad = np.pad(sub, 1)
    interior = sub.copy()
    for ax in range(3):
        for step in (-1, 1):
            interior &= np.roll(pad, step, axis=ax)[1:-1, 1:-1, 1:-1]
    boundary = np.argwhere(sub & ~interior) + lo
    shape = np.asarray(m.shape)
    on_face = boundary[((boundary == 0) | (boundary == shape - 1)).any(axis=1)]
    T = np.asarray(T_ct_from_ijk, dtype=np.float64)

    def corners(kji_idx: np.ndarray) -> np.ndarray:
        if len(kji_idx) == 0:
            return np.zeros((0, 3))
        # corners on the doubled integer lattice (2 index + 1), deduplicated
        offs = np.array([[a, b, c] for a in (-1, 1) for b in (-1, 1) for c in (-1, 1)])
        lattice = (2 * kji_idx[:, None, ::-1] + offs[None]).reshape(-1, 3)
        lattice = np.unique(lattice, axis=0)
        ijk = lattice / 2.0
        return ijk @ T[:3, :3].T + T[:3, 3]

    return corners(boundary), corners(on_face)


def _pose_np(T) -> np.ndarray:
    return np.asarray(T.detach().cpu().numpy() if isinstance(T, torch.Tensor) else T, dtype=np.float64)


def _project(pts: np.ndarray, T: np.ndarray, K: np.ndarray) -> tuple:
    """Pixel positions ``(N, 2)`` and depths ``(N,)`` (mm) of the CT points (mm) in front of the source at pose ``T``.

    Computed in float32 (about 1e-5 mm at CT coordinates of a few hundred mm): points behind
    or at the source are left out.
    """
    P = (K @ T[:3]).astype(np.float32)  # (3, 4): [u w, v w, w] = P [p; 1], w the depth (K's last row is 0 0 1)
    uvw = pts @ P[:, :3].T + P[:, 3]
    z = uvw[:, 2]
    front = z > 1e-3
    if not front.all():
        uvw, z = uvw[front], z[front]
    return uvw[:, :2] / z[:, None], z


class OutlineOverlay:
    """Projected outlines of labelled structures, drawn on frames at given poses.

    Parameters
    ----------
    layers : sequence of OutlineLayer
        The structures, drawn in order (the target last, on top).
    """

    def __init__(self, layers):
        self.layers = list(layers)

    @classmethod
    def from_ct(cls, ct, target, neighbours: int = 1) -> "OutlineOverlay":
        """Outlines of a CT's target structure and, fainter, of its neighbouring vertebrae.

        Parameters
        ----------
        ct : CTVolume
            Volume with a label map (the whole CT, or a crop of it: a neighbour cut by the crop is
            outlined only where it is not cut).
        target : str or int
            The target structure (a name such as ``T8``, or a label id).
        neighbours : int
            Vertebrae on each side of a vertebral target to outline as well (those with voxels in
            ``ct``); 0: the target only.
        """
        from .volume import resolve_label
        from .volume.totalseg import ALIASES, short_name

        lid = resolve_label(target, ct.label_names)
        by_id = {i: n for n, i in ct.label_names.items()}
        spacing = float(np.max(ct.spacing_mm))
        layers = []
        name = by_id.get(lid, str(target))
        order = list(ALIASES.values())
        if neighbours > 0 and name in order and ct.labels is not None:
            present = set(np.unique(ct.labels).tolist())
            k = order.index(name)
            for other in order[max(0, k - neighbours):k] + order[k + 1:k + 1 + neighbours]:
                oid = ct.label_names.get(other)
                if oid is not None and oid in present:
                    pts, cut = boundary_corner_points(ct.labels == oid, ct.T_ct_from_ijk)
                    layers.append(OutlineLayer(short_name(other), pts, cut, spacing, NEIGHBOUR_RGB, NEIGHBOUR_ALPHA))
        pts, cut = boundary_corner_points(ct.label_mask([lid]), ct.T_ct_from_ijk)
        layers.append(OutlineLayer(short_name(name), pts, cut, spacing, GREEN, 1.0))
        return cls(layers)

    @property
    def target(self) -> OutlineLayer:
        """The target's layer (the last)."""
        return self.layers[-1]

    def silhouette_mask(self, layer: OutlineLayer, T, K, height: int, width: int, pad: int | None = None) -> tuple:
        """Projected silhouette of one layer: ``(mask, pad, cut mask)``.

        Parameters
        ----------
        layer : OutlineLayer
            The structure.
        T : torch.Tensor or np.ndarray
            ``(4, 4)`` ``T_optical_from_ct``, mm.
        K : torch.Tensor or np.ndarray
            ``(3, 3)`` intrinsics, pixels.
        height, width : int
            Frame size.
        pad : int, optional
            Margin (pixels) around the frame that the mask covers, so that a structure partly
            outside the frame is closed outside it; default from the closing size.

        Returns
        -------
        (np.ndarray, int, np.ndarray or None)
            ``(H + 2 pad, W + 2 pad)`` uint8 mask (255 inside), ``pad``, and the mask of where the
            structure's cut faces project (dilated by the closing size; None without cuts).
        """
        import cv2

        T, K = _pose_np(T), _pose_np(K)
        uv, z = _project(layer.pts_ct_mm, T, K)
        if not len(z):
            return np.zeros((height, width), np.uint8), 0, None
        # gaps between neighbouring projected corners: at most the largest spacing seen at the nearest depth
        gap_px = max(K[0, 0], K[1, 1]) * layer.spacing_mm / float(z.min())
        ksize = int(math.ceil(gap_px)) + 1
        ksize += 1 - ksize % 2
        pad = (2 * ksize + 2) if pad is None else int(pad)
        Hp, Wp = height + 2 * pad, width + 2 * pad

        def splat(uv_pts: np.ndarray) -> np.ndarray:
            m = np.zeros((Hp, Wp), np.uint8)
            # clipped into a one-pixel frame around the padded mask (dropped below): no overflow, no wrap-around
            ui = np.rint(np.clip(uv_pts[:, 0] + pad, -1, Wp)).astype(np.int64)
            vi = np.rint(np.clip(uv_pts[:, 1] + pad, -1, Hp)).astype(np.int64)
            inside = (ui >= 0) & (ui < Wp) & (vi >= 0) & (vi < Hp)
            m.reshape(-1)[vi[inside] * Wp + ui[inside]] = 255
            return m

        mask = splat(uv)
        if ksize > 1:
            kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (ksize, ksize))
            mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, kernel)
        cut = None
        if len(layer.cut_pts_ct_mm):
            cuv, _ = _project(layer.cut_pts_ct_mm, T, K)
            cut = cv2.dilate(splat(cuv), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (ksize + 2, ksize + 2)))
        return mask, pad, cut

    def outlines(self, layer: OutlineLayer, T, K, height: int, width: int) -> list:
        """Outline polylines of one layer at a pose.

        Parameters
        ----------
        layer : OutlineLayer
            The structure.
        T, K, height, width
            As :meth:`silhouette_mask`.

        Returns
        -------
        list of (np.ndarray, bool)
            Each polyline (``(M, 1, 2)`` int32 ``(u, v)``) in frame pixels (it may run outside the frame; drawing clips it) and
            whether it is closed. A contour that passes where the structure is cut is split there
            into open pieces.
        """
        import cv2

        mask, pad, cut = self.silhouette_mask(layer, T, K, height, width)
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        out = []
        for c in contours:
            if cut is None:
                out.append((c - pad, True))
                continue
            pts = c[:, 0]
            keep = cut[pts[:, 1], pts[:, 0]] == 0
            if keep.all():
                out.append((c - pad, True))
                continue
            if not keep.any():
                continue
            # runs of kept points, the run that wraps around the start joined
            start = int(np.flatnonzero(~keep)[0])
            pts, keep = np.roll(pts, -start, axis=0), np.roll(keep, -start)
            edges = np.flatnonzero(np.diff(np.r_[0, keep.astype(np.int8), 0]))
            for a, b in zip(edges[::2], edges[1::2]):
                if b - a >= 2:
                    out.append(((pts[a:b] - pad)[:, None, :].astype(np.int32), False))
        return out

    def draw(self, rgb: np.ndarray, T, K, thickness: int | None = None) -> np.ndarray:
        """Draw every layer's outline at a pose.

        Parameters
        ----------
        rgb : np.ndarray
            ``(H, W, 3)`` uint8 image, changed in place and returned.
        T : torch.Tensor or np.ndarray
            ``(4, 4)`` ``T_optical_from_ct``, mm.
        K : torch.Tensor or np.ndarray
            ``(3, 3)`` intrinsics of the image, pixels.
        thickness : int, optional
            Line thickness in pixels (default :func:`line_thickness` of the width).
        """
        import cv2

        h, w = rgb.shape[:2]
        th = thickness or line_thickness(w)
        for layer in self.layers:
            lines = self.outlines(layer, T, K, h, w)
            if not lines:
                continue
            colour = tuple(int(c) for c in layer.rgb)
            target = rgb if layer.alpha >= 1 else rgb.copy()
            for closed in (True, False):
                polys = [p for p, c in lines if c == closed]
                if polys:
                    cv2.polylines(target, polys, closed, colour, th, lineType=cv2.LINE_AA)
            if layer.alpha < 1:
                cv2.addWeighted(target, layer.alpha, rgb, 1 - layer.alpha, 0, dst=rgb)
        return rgb


def line_thickness(width: int) -> int:
    """Outline thickness for a frame ``width`` pixels wide (1 up to 384 pixels, then 2, ...)."""
    return max(1, int(round(width / 384)))


# ---------------------------------------------------------------------------------------------
# legend and frames


def legend_lines(state: str, confidence: float | None = None, latency_ms: float | None = None, target: str = "",
                 note: str = "") -> list:
    """The legend's lines: the outline's name and the state, the confidence and the latency.

    Parameters
    ----------
    state : str
        The node's state (its colour: green tracking, yellow initialising, red lost).
    confidence : float, optional
        Confidence to show (the inlier fraction of the registration, 0-1).
    latency_ms : float, optional
        Latency to show, ms.
    target : str
        Name of the outlined structure.
    note : str
        A third line (e.g. why there is no pose).

    Returns
    -------
    list of (str, tuple)
        Text and RGB colour of each line, for :func:`draw_legend`.
    """
    first = f"{target} " if target else ""
    lines = [(f"{first}{state}", STATE_RGB.get(state, (255, 255, 255)))]
    parts = []
    if confidence is not None:
        parts.append(f"conf {confidence:.2f}")
    if latency_ms is not None:
        parts.append(f"{latency_ms:.0f} ms")
    if parts:
        lines.append(("  ".join(parts), (235, 235, 235)))
    if note:
        lines.append((note, (255, 255, 255)))
    return lines


def draw_legend(rgb: np.ndarray, lines, corner: str = "top-left") -> np.ndarray:
    """Write text lines on a darkened box in a corner of ``rgb`` (``(H, W, 3)`` uint8, in place; returned).

    Parameters
    ----------
    rgb : np.ndarray
        The image.
    lines : sequence of (str, rgb)
        Text and colour of each line (ASCII).
    corner : str
        ``top-left`` or ``bottom-left``.
    """
    import cv2

    h, w = rgb.shape[:2]
    scale = float(np.clip(0.33 * w / 256, 0.27, 0.9))
    font = cv2.FONT_HERSHEY_SIMPLEX
    th = max(1, int(round(scale * 1.6)))
    sizes = [cv2.getTextSize(t, font, scale, th) for t, _ in lines]
    line_h = max(s[0][1] + s[1] for s in sizes) + max(2, int(round(3 * scale)))
    box_w = min(w, max(s[0][0] for s in sizes) + 6)
    box_h = min(h, line_h * len(lines) + 4)
    y0 = 0 if corner == "top-left" else h - box_h
    roi = rgb[y0:y0 + box_h, 0:box_w]
    roi[...] = (roi.astype(np.uint16) * 2 // 7).astype(np.uint8)
    for i, ((text, colour), (size, base)) in enumerate(zip(lines, sizes)):
        y = y0 + 2 + (i + 1) * line_h - base - 1
        cv2.putText(rgb, text, (3, y), font, scale, tuple(int(c) for c in colour), th, cv2.LINE_AA)
    return rgb


def mark_refused(rgb: np.ndarray, colour=RED) -> np.ndarray:
    """A border around ``rgb`` (``(H, W, 3)`` uint8, in place; returned): this frame got no pose."""
    h, w = rgb.shape[:2]
    b = max(2, int(round(w / 128)))
    c = np.asarray(colour, dtype=np.uint8)
    rgb[:b], rgb[h - b:], rgb[:, :b], rgb[:, w - b:] = c, c, c, c
    return rgb


def overlay_frame(image: np.ndarray, outline: OutlineOverlay | None = None, T=None, K=None, legend=None,
                  refused: bool = False) -> np.ndarray:
    """The overlay image: the contrast-normalised frame, the outlines at ``T`` and a legend.

    Parameters
    ----------
    image : np.ndarray
        ``(H, W)`` frame (attenuation-like: bright = more material) or uint8.
    outline : OutlineOverlay, optional
        What to outline; with ``T`` and ``K``.
    T : torch.Tensor or np.ndarray, optional
        ``(4, 4)`` ``T_optical_from_ct`` (mm) to draw the outlines at; None: no outlines (a frame
        without a pose).
    K : torch.Tensor or np.ndarray, optional
        ``(3, 3)`` intrinsics of the frame, pixels.
    legend : sequence of (str, rgb), optional
        Legend lines (:func:`legend_lines`).
    refused : bool
        Frame a red border: the frame got no pose.

    Returns
    -------
    np.ndarray
        ``(H, W, 3)`` uint8 RGB.
    """
    grey = image if image.dtype == np.uint8 else contrast_normalise(image)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    if outline is not None and T is not None:
        outline.draw(rgb, T, K)
    if legend:
        draw_legend(rgb, legend)
    if refused:
        mark_refused(rgb)
    return rgb


# ---------------------------------------------------------------------------------------------
# reference: ray-cast silhouettes (slow; for checks)


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
