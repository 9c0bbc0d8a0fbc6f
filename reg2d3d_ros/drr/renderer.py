"""Differentiable DRR ray casting through a CT (conventions: :mod:`reg2d3d_ros.geometry`).

Model
-----
The CT is a trilinearly interpolated field of linear attenuation ``mu`` (1/mm) that is zero
outside the volume's box (the outer voxel faces, index ``-0.5 .. n - 0.5``). For every pixel,
the ray from the source through the pixel centre is clipped to that box and the line integral
``L = int mu ds`` (dimensionless) is approximated with the midpoint rule on ``n`` equal steps
between the ray's entry and exit of the box, ``n = ceil(chord / step_mm)`` per ray (so a ray's
value never depends on the other rays of the call). The result is differentiable with respect
to the pose and the intrinsics through ``torch.nn.functional.grid_sample``.

Bone surfaces
-------------
With an occupancy volume (1 inside bone, 0 outside, possibly fractional at the border) the
same samples also give the first and last crossing of the ``occupancy = 0.5`` level along each
ray, refined by linear interpolation between the two samples around the crossing: the entry
and exit depth (optical ``z``, mm) and the CT coordinates there (scene coordinates), with a
hit mask for rays that meet no bone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..geometry.camera import pixel_rays_optical, source_position_ct


@dataclass
class DRROutput:
    """Result of :meth:`DRRRenderer.render`.

    Attributes
    ----------
    line_integral : torch.Tensor
        ``(B, H, W)`` line integrals of ``mu`` (dimensionless), volume dtype.
    entry_depth_mm, exit_depth_mm : torch.Tensor or None
        ``(B, H, W)`` optical ``z`` of the first/last bone-surface crossing, mm (0 where no hit).
    entry_ct_mm, exit_ct_mm : torch.Tensor or None
        ``(B, H, W, 3)`` CT-frame coordinates of those crossings, mm (0 where no hit).
    hit : torch.Tensor or None
        ``(B, H, W)`` bool, True where the ray crosses bone.
    """

    line_integral: torch.Tensor
    entry_depth_mm: torch.Tensor | None = None
    exit_depth_mm: torch.Tensor | None = None
    entry_ct_mm: torch.Tensor | None = None
    exit_ct_mm: torch.Tensor | None = None
    hit: torch.Tensor | None = None


class DRRRenderer:
    """Ray caster over one CT.

    Parameters
    ----------
    mu : torch.Tensor or np.ndarray
        ``(D, H, W)`` linear attenuation, 1/mm, array order ``(k, j, i)``. Its dtype (float32
        recommended) and device are the renderer's.
    T_ct_from_ijk : array-like
        ``(4, 4)`` voxel index to CT mm affine.
    occupancy : torch.Tensor or np.ndarray, optional
        ``(D, H, W)`` bone occupancy in ``[0, 1]`` on the same grid, for surface crossings.
    step_mm : float, optional
        Nominal sampling step along rays, mm; default: the smallest voxel spacing.
    max_samples_per_chunk : int
        Rays are processed in chunks of at most this many samples (memory bound).
    """

    def __init__(self, mu, T_ct_from_ijk, occupancy=None, step_mm: float | None = None, max_samples_per_chunk: int = 4_000_000):
        mu = torch.as_tensor(mu)
        if mu.ndim != 3:
            raise ConfigError(f"mu must be (D, H, W), got shape {tuple(mu.shape)}")
        if not mu.is_floating_point():
            mu = mu.float()
        self.dtype = mu.dtype
        self.device = mu.device
        channels = [mu]
        if occupancy is not None:
            occ = torch.as_tensor(occupancy, device=self.device).to(self.dtype)
            if occ.shape != mu.shape:
                raise ConfigError(f"occupancy shape {tuple(occ.shape)} differs from mu shape {tuple(mu.shape)}")
            channels.append(occ)
        self.has_occupancy = occupancy is not None
        self._vol = torch.stack(channels, dim=0)[None].contiguous()  # (1, C, D, H, W)
        T = torch.as_tensor(np.asarray(T_ct_from_ijk), dtype=torch.float64)
        self.T_ct_from_ijk = T
        self.T_ijk_from_ct = torch.linalg.inv(T)
        d, h, w = mu.shape
        self.shape_ijk = (w, h, d)
        spacing = torch.linalg.norm(T[:3, :3], dim=0)
        self.step_mm = float(spacing.min()) if step_mm is None else float(step_mm)
        if self.step_mm <= 0:
            raise ConfigError(f"step_mm must be positive, got {self.step_mm}")
        self.max_samples_per_chunk = int(max_samples_per_chunk)

    @classmethod
    def from_volume(cls, ct, bone_mask: np.ndarray | None = None, dtype=torch.float32, device=None, **kwargs) -> "DRRRenderer":
        """Renderer of a :class:`~reg2d3d_ros.volume.CTVolume` (``mu`` from its HU).

        Parameters
        ----------
        ct : CTVolume
            The volume.
        bone_mask : np.ndarray, optional
            ``(D, H, W)`` bool or float occupancy for surface crossings.
        """
        mu = torch.as_tensor(ct.mu(), dtype=dtype, device=device)
        occ = None if bone_mask is None else torch.as_tensor(np.asarray(bone_mask, dtype=np.float32), dtype=dtype, device=device)
        return cls(mu, ct.T_ct_from_ijk, occupancy=occ, **kwargs)

    # ------------------------------------------------------------------------------------
    def render(self, T_optical_from_ct: torch.Tensor, K: torch.Tensor, height: int, width: int, surfaces: bool = False) -> DRROutput:
        """Render DRRs (and optionally bone-surface crossings) for a batch of poses.

        Parameters
        ----------
        T_optical_from_ct : torch.Tensor
            ``(B, 4, 4)`` or ``(4, 4)`` poses, mm, any float dtype; gradients flow through it.
        K : torch.Tensor
            ``(B, 3, 3)`` or ``(3, 3)`` intrinsics, pixels.
        height, width : int
            Image size.
        surfaces : bool
            Also compute entry/exit crossings (needs ``occupancy``).

        Returns
        -------
        DRROutput
            Images ``(B, H, W)``.
        """
        T = T_optical_from_ct if T_optical_from_ct.ndim == 3 else T_optical_from_ct[None]
        B = T.shape[0]
        K = K if K.ndim == 3 else K[None]
        K = K.to(T.dtype).expand(B, 3, 3)
        dirs_opt = pixel_rays_optical(K, height, width)  # (B, HW, 3)
        out = self.render_rays(T, dirs_opt, surfaces=surfaces)
        shape = (B, height, width)
        return DRROutput(
            line_integral=out.line_integral.reshape(shape),
            entry_depth_mm=None if out.entry_depth_mm is None else out.entry_depth_mm.reshape(shape),
            exit_depth_mm=None if out.exit_depth_mm is None else out.exit_depth_mm.reshape(shape),
            entry_ct_mm=None if out.entry_ct_mm is None else out.entry_ct_mm.reshape(*shape, 3),
            exit_ct_mm=None if out.exit_ct_mm is None else out.exit_ct_mm.reshape(*shape, 3),
            hit=None if out.hit is None else out.hit.reshape(shape),
        )

    def render_rays(self, T_optical_from_ct: torch.Tensor, dirs_optical: torch.Tensor, surfaces: bool = False) -> DRROutput:
        """Line integrals along arbitrary rays from the source.

        Parameters
        ----------
        T_optical_from_ct : torch.Tensor
            ``(B, 4, 4)`` poses, mm.
        dirs_optical : torch.Tensor
            ``(B, R, 3)`` unit ray directions in the optical frame.
        surfaces : bool
            Also compute bone-surface crossings.

        Returns
        -------
        DRROutput
            Fields shaped ``(B, R)`` (``(B, R, 3)`` for CT points).
        """
        if surfaces and not self.has_occupancy:
            raise ConfigError("surface crossings need a renderer built with an occupancy (bone) volume")
        B, R, _ = dirs_optical.shape
        T = T_optical_from_ct.to(self.T_ijk_from_ct.device)
        work = T.dtype
        A = self.T_ijk_from_ct.to(work)
        src_ct = source_position_ct(T)  # (B, 3)
        dirs_ct = dirs_optical.to(work) @ T[:, :3, :3]  # R^T d for row vectors: (B, R, 3)
        src_ijk = src_ct @ A[:3, :3].T + A[:3, 3]  # (B, 3)
        dir_ijk = dirs_ct @ A[:3, :3].T  # (B, R, 3) index units per mm
        s_near, s_far, hit_box = self._clip_to_box(src_ijk, dir_ijk)

        integral = torch.zeros(B, R, dtype=self.dtype, device=self.device)
        want_surf = surfaces
        if want_surf:
            s_entry = torch.zeros(B, R, dtype=work, device=T.device)
            s_exit = torch.zeros(B, R, dtype=work, device=T.device)
            bone_hit = torch.zeros(B, R, dtype=torch.bool, device=T.device)
        idx = hit_box.nonzero(as_tuple=False)  # rays that cross the box
        if idx.shape[0]:
            # Per-ray sample count n_r = ceil(chord / step): the result of a ray does not depend
            # on the other rays of the call. Rays are sorted by n_r and processed in chunks padded
            # to the chunk's largest n_r; padded samples are masked out.
            chord = (s_far - s_near)[idx[:, 0], idx[:, 1]]
            n_ray = torch.clamp(torch.ceil(chord.detach() / self.step_mm), min=1).to(torch.long)
            order = torch.argsort(n_ray, descending=True)
            idx, n_ray = idx[order], n_ray[order]
            # Normalised grid coordinates (align_corners=True): x_n = 2 i / (W - 1) - 1.
            size = torch.tensor(self.shape_ijk, dtype=work, device=T.device)
            scale = 2.0 / (size - 1.0)
            g0 = src_ijk * scale - 1.0  # (B, 3)
            gd = dir_ijk * scale  # (B, R, 3)
            parts_int, parts_entry, parts_exit, parts_hit = [], [], [], []
            start = 0
            while start < idx.shape[0]:
                n = int(n_ray[start])
                stop = min(idx.shape[0], start + max(1, self.max_samples_per_chunk // n))
                b, r, nr = idx[start:stop, 0], idx[start:stop, 1], n_ray[start:stop]
                sn, sf = s_near[b, r], s_far[b, r]
                h = (sf - sn) / nr.to(work)  # (M,) per-ray step, mm
                k = torch.arange(n, dtype=work, device=T.device)
                valid = k[None, :] < nr[:, None]  # (M, n)
                s = sn[:, None] + (k[None, :] + 0.5) * h[:, None]  # (M, n) midpoints, mm
                grid = g0[b][:, None, :] + s[..., None] * gd[b, r][:, None, :]  # (M, n, 3)
                samples = F.grid_sample(
                    self._vol,
                    grid.to(self.dtype)[None, None],
                    mode="bilinear",
                    padding_mode="zeros",
                    align_corners=True,
                )[0, :, 0]  # (C, M, n)
                samples = samples * valid.to(self.dtype)
                parts_int.append(samples[0].sum(dim=-1) * h.to(self.dtype))
                if want_surf:
                    e, x, hb = self._crossings(samples[1].detach(), s.detach(), h.detach())
                    parts_entry.append(e)
                    parts_exit.append(x)
                    parts_hit.append(hb)
                start = stop
            flat = idx[:, 0] * R + idx[:, 1]
            integral = integral.reshape(-1).index_put((flat,), torch.cat(parts_int)).reshape(B, R)
            if want_surf:
                s_entry = s_entry.reshape(-1).index_put((flat,), torch.cat(parts_entry)).reshape(B, R)
                s_exit = s_exit.reshape(-1).index_put((flat,), torch.cat(parts_exit)).reshape(B, R)
                bone_hit = bone_hit.reshape(-1).index_put((flat,), torch.cat(parts_hit)).reshape(B, R)
        out = DRROutput(line_integral=integral)
        if want_surf:
            entry_ct = src_ct.detach()[:, None, :] + s_entry[..., None] * dirs_ct.detach()
            exit_ct = src_ct.detach()[:, None, :] + s_exit[..., None] * dirs_ct.detach()
            z = dirs_optical.detach().to(work)[..., 2]
            m = bone_hit.to(work)
            out.entry_depth_mm = s_entry * z * m
            out.exit_depth_mm = s_exit * z * m
            out.entry_ct_mm = entry_ct * m[..., None]
            out.exit_ct_mm = exit_ct * m[..., None]
            out.hit = bone_hit
        return out

    def _clip_to_box(self, src_ijk: torch.Tensor, dir_ijk: torch.Tensor):
        """Slab test against the box ``-0.5 .. n - 0.5``; returns ``s_near, s_far`` (mm) and a hit mask."""
        lo = torch.full((3,), -0.5, dtype=src_ijk.dtype, device=src_ijk.device)
        hi = torch.tensor(self.shape_ijk, dtype=src_ijk.dtype, device=src_ijk.device) - 0.5
        src = src_ijk[:, None, :]  # (B, 1, 3)
        tiny = dir_ijk.abs() < 1e-12
        safe = torch.where(tiny, torch.ones_like(dir_ijk), dir_ijk)
        t1 = (lo - src) / safe
        t2 = (hi - src) / safe
        tmin = torch.minimum(t1, t2)
        tmax = torch.maximum(t1, t2)
        inside = (src >= lo) & (src <= hi)  # (B, 1, 3): parallel rays must start inside the slab
        big = torch.finfo(src_ijk.dtype).max / 4
        tmin = torch.where(tiny, torch.where(inside, torch.full_like(tmin, -big), torch.full_like(tmin, big)), tmin)
        tmax = torch.where(tiny, torch.where(inside, torch.full_like(tmax, big), torch.full_like(tmax, -big)), tmax)
        s_near = torch.clamp(tmin.max(dim=-1).values, min=0.0)
        s_far = tmax.min(dim=-1).values
        return s_near, s_far, s_far > s_near

    @staticmethod
    def _crossings(occ: torch.Tensor, s: torch.Tensor, h: torch.Tensor):
        """First/last crossing of occupancy 0.5 along sampled rays.

        ``occ`` and ``s`` are ``(M, n)`` (occupancy and ray parameter in mm), ``h`` ``(M,)``.
        Returns ``s_entry, s_exit`` ``(M,)`` in mm and a hit mask ``(M,)``.
        """
        M, n = occ.shape
        inside = occ >= 0.5
        hit = inside.any(dim=-1)
        first = torch.argmax(inside.to(torch.uint8), dim=-1)
        last = n - 1 - torch.argmax(inside.flip(-1).to(torch.uint8), dim=-1)
        rows = torch.arange(M, device=occ.device)
        occ = occ.to(s.dtype)
        # entry: between first-1 (outside) and first (inside)
        fp = (first - 1).clamp(min=0)
        o0, o1 = occ[rows, fp], occ[rows, first]
        t = ((0.5 - o0) / (o1 - o0).clamp(min=1e-12)).clamp(0.0, 1.0)
        s_entry = torch.where(first > 0, s[rows, fp] + t * h, s[rows, first] - 0.5 * h)
        # exit: between last (inside) and last+1 (outside)
        ln = (last + 1).clamp(max=n - 1)
        o0, o1 = occ[rows, last], occ[rows, ln]
        t = ((o0 - 0.5) / (o0 - o1).clamp(min=1e-12)).clamp(0.0, 1.0)
        s_exit = torch.where(last < n - 1, s[rows, last] + t * h, s[rows, last] + 0.5 * h)
        return s_entry, s_exit, hit
