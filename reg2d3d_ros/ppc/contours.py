"""Apparent-contour selection of surface points for a pose (conventions: :mod:`reg2d3d_ros.geometry`).

A surface point belongs to the apparent contour when its gradient is (nearly) perpendicular to
the viewing ray through it: ``|g . r| <= max_cos`` with ``r`` the unit ray from the source. The
selected points are projected to ``uv``; their 2-D normal is the image of the 3-D gradient under
the projection's Jacobian, ``J(w) g`` (normalised), which points across the image contour
towards the bone (higher attenuation). At most one point per ``cell_px`` x ``cell_px`` pixel
cell is kept (the most perpendicular one), so the correspondences cover the contour evenly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Contours:
    """Selected contour points for one pose.

    Attributes
    ----------
    index : torch.Tensor
        ``(N,)`` long indices into the surface points.
    w_opt : torch.Tensor
        ``(N, 3)`` points, optical frame, mm.
    g_opt : torch.Tensor
        ``(N, 3)`` unit gradients, optical frame.
    uv : torch.Tensor
        ``(N, 2)`` projections, pixels.
    normal_2d : torch.Tensor
        ``(N, 2)`` unit image normals (towards the bone).
    """

    index: torch.Tensor
    w_opt: torch.Tensor
    g_opt: torch.Tensor
    uv: torch.Tensor
    normal_2d: torch.Tensor

    def __len__(self) -> int:
        return int(self.index.shape[0])


def projection_jacobian_apply(K: torch.Tensor, p_opt: torch.Tensor, d_opt: torch.Tensor) -> torch.Tensor:
    """Image displacement ``(N, 2)`` (pixels per mm) of moving points ``p_opt`` ``(N, 3)`` along ``d_opt`` ``(N, 3)``."""
    x, y, z = p_opt[:, 0], p_opt[:, 1], p_opt[:, 2]
    dx, dy, dz = d_opt[:, 0], d_opt[:, 1], d_opt[:, 2]
    du = K[0, 0] * (dx * z - x * dz) / (z * z)
    dv = K[1, 1] * (dy * z - y * dz) / (z * z)
    return torch.stack([du, dv], dim=-1)


def select_contours(
    pts_ct_mm: torch.Tensor,
    normals_ct: torch.Tensor,
    T_optical_from_ct: torch.Tensor,
    K: torch.Tensor,
    height: int,
    width: int,
    max_cos: float = 0.15,
    cell_px: float = 1.0,
    margin_px: float = 2.0,
    max_points: int | None = None,
    generator: torch.Generator | None = None,
) -> Contours:
    """Apparent-contour points of a surface at a pose.

    Parameters
    ----------
    pts_ct_mm, normals_ct : torch.Tensor
        ``(M, 3)`` surface points (mm) and unit gradients, CT frame.
    T_optical_from_ct : torch.Tensor
        ``(4, 4)`` pose, mm.
    K : torch.Tensor
        ``(3, 3)`` intrinsics of the image the contours are matched in.
    height, width : int
        That image's size.
    max_cos : float
        Largest ``|cos|`` between gradient and viewing ray.
    cell_px : float
        Thinning cell size, pixels (one point per cell).
    margin_px : float
        Points closer than this to the border are dropped.
    max_points : int, optional
        Random subsample to at most this many (seeded by ``generator``).
    """
    R, t = T_optical_from_ct[:3, :3], T_optical_from_ct[:3, 3]
    w = pts_ct_mm @ R.T + t
    g = normals_ct @ R.T
    r = w / torch.linalg.norm(w, dim=-1, keepdim=True)
    cos = (g * r).sum(dim=-1).abs()
    keep = (cos <= max_cos) & (w[:, 2] > 1.0)
    idx = keep.nonzero()[:, 0]
    w, g, cos = w[idx], g[idx], cos[idx]
    q = w @ K.T
    uv = q[:, :2] / q[:, 2:3]
    inside = (uv[:, 0] >= margin_px) & (uv[:, 0] <= width - 1 - margin_px) & (uv[:, 1] >= margin_px) & (uv[:, 1] <= height - 1 - margin_px)
    n2 = projection_jacobian_apply(K, w, g)
    n2_norm = torch.linalg.norm(n2, dim=-1)
    inside &= n2_norm > 1e-9
    sel = inside.nonzero()[:, 0]
    idx, w, g, uv, cos, n2, n2_norm = idx[sel], w[sel], g[sel], uv[sel], cos[sel], n2[sel], n2_norm[sel]
    if len(idx) and cell_px > 0:
        cells_w = int(width // cell_px) + 2
        cell = torch.floor(uv[:, 1] / cell_px).long() * cells_w + torch.floor(uv[:, 0] / cell_px).long()
        # most perpendicular point per cell: sort by cos, then keep the first of each cell
        order = torch.argsort(cos, stable=True)
        cell_sorted = cell[order]
        order2 = torch.argsort(cell_sorted, stable=True)
        cs = cell_sorted[order2]
        first = torch.ones_like(cs, dtype=torch.bool)
        first[1:] = cs[1:] != cs[:-1]
        chosen = order[order2[first]]
        chosen = torch.sort(chosen).values
        idx, w, g, uv, n2, n2_norm = idx[chosen], w[chosen], g[chosen], uv[chosen], n2[chosen], n2_norm[chosen]
    if max_points is not None and len(idx) > max_points:
        pick = torch.sort(torch.randperm(len(idx), generator=generator)[:max_points]).values
        idx, w, g, uv, n2, n2_norm = idx[pick], w[pick], g[pick], uv[pick], n2[pick], n2_norm[pick]
    return Contours(index=idx, w_opt=w, g_opt=g, uv=uv, normal_2d=n2 / n2_norm[:, None])
