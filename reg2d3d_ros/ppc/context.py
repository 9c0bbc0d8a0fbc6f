"""Which vertebra? The neighbour check of an initialisation, read from the whole field of view.

Neighbouring vertebrae look alike: a registration of the target's contour (PPC) or of the
target's DRR (gradient correlation in a region around it) can lock onto the vertebra above or
below, and every check that only looks at the target passes (the neighbour matches as well as the
target would). The rest of the field of view does not repeat: ribs, heart, diaphragm and the
edges of the anatomy sit elsewhere when the pose is one vertebra off. This check renders the
*whole CT* (not only the target) at the registered pose and at the pose that puts the target one
vertebra up or down (``T @ translation(c_target - c_neighbour)``, the pose the truth would be if
the registration had locked onto that neighbour) and compares their gradient correlation with
the frame. A registration that locked onto a neighbour sees the shifted pose correlate better.

Measured on the benchmark's tuning frames (T7, T9, T11; randomised physics and DiffDRR;
``benchmarks/results/neighbour_check.md``): at the true pose the best neighbour-shifted pose
reaches at most 0.74 of the true pose's correlation, at an exact lock at least 1.38 times it.
Registrations from far starts also end in partial locks (the neighbour plus some rotation) with
ratios of 0.8-1: the pipeline's threshold (``max_neighbour_gc_ratio``) is 0.85, chosen on the
tuning split's single-frame registrations (``benchmarks/results/neighbour_threshold.md``).
"""

from __future__ import annotations

import re

import numpy as np
import torch

from ..geometry.camera import CArmIntrinsics

#: The order of the spine's vertebrae in TotalSegmentator's names (``vertebrae_<name>``).
SPINE = tuple([f"C{i}" for i in range(1, 8)] + [f"T{i}" for i in range(1, 13)] + [f"L{i}" for i in range(1, 6)] + ["S1"])


#: A neighbour-shifted pose must correlate at least this well with the frame to count as evidence of
#: a lock: at a lock the shifted pose is the truth, which correlates 0.29-0.99 on the tuning frames
#: (``benchmarks/results/neighbour_check.jsonl``); below it (a tiny or empty frame) the check has
#: nothing to say.
MIN_EVIDENCE_GC = 0.1


def _spine_name(label_name: str):
    m = re.fullmatch(r"vertebrae_([CTLS]\d+)", label_name)
    return m.group(1) if m and m.group(1) in SPINE else None


class NeighbourCheck:
    """Gradient correlation of the whole CT's DRR with a frame, at a pose and with the target moved onto its neighbours.

    Parameters
    ----------
    renderer : DRRRenderer
        Renderer of the whole CT as the X-rays see it.
    offsets_ct_mm : dict
        ``{neighbour name: (3,) float64}``: ``c_target - c_neighbour`` (CT frame, mm) of each
        neighbouring vertebra present in the label map.
    size_px : int
        The correlation is computed on the frame scaled so that its longer side has this many
        pixels (64: a 256 frame at level 0.25; the context is large, fine detail is not needed).
    """

    def __init__(self, renderer, offsets_ct_mm: dict, size_px: int = 64):
        self.renderer = renderer
        self.offsets_ct_mm = {k: np.asarray(v, dtype=np.float64) for k, v in offsets_ct_mm.items()}
        self.size_px = int(size_px)

    @classmethod
    def from_ct(cls, ct, target_label_id: int, size_px: int = 64, step_factor: float = 2.0):
        """The check of a target, or None when the target is not a vertebra with a labelled neighbour.

        ``step_factor`` scales the renderer's ray step (default: the binned voxel size) for speed.
        """

        names = {i: n for n, i in ct.label_names.items()}
        name = _spine_name(names.get(int(target_label_id), ""))
        if name is None or ct.labels is None:
            return None
        from ..sim.scenarios import structure_center

        k = SPINE.index(name)
        present = set(np.unique(ct.labels).tolist())
        c_t = structure_center(ct, f"vertebrae_{name}")
        offsets = {}
        for j in (k - 1, k + 1):
            lid = ct.label_names.get(f"vertebrae_{SPINE[j]}") if 0 <= j < len(SPINE) else None
            if lid is not None and lid in present:
                offsets[SPINE[j]] = c_t - structure_center(ct, f"vertebrae_{SPINE[j]}")
        if not offsets:
            return None
        return cls(whole_ct_renderer(ct, step_factor), offsets, size_px)

    def candidates(self, T_optical_from_ct: torch.Tensor) -> dict:
        """``{"pose": T, name: T @ translation(offset)}``, ``(4, 4)`` float64 each (mm)."""
        T = torch.as_tensor(T_optical_from_ct, dtype=torch.float64)
        out = {"pose": T}
        for name, off in self.offsets_ct_mm.items():
            S = torch.eye(4, dtype=torch.float64)
            S[:3, 3] = torch.from_numpy(off)
            out[name] = T @ S
        return out

    def __call__(self, image_att: np.ndarray, intrinsics: CArmIntrinsics, T_optical_from_ct: torch.Tensor) -> dict:
        """Score a registered pose against its neighbour-shifted versions.

        Parameters
        ----------
        image_att : np.ndarray
            ``(H, W)`` attenuation-like frame.
        intrinsics : CArmIntrinsics
            The frame's camera.
        T_optical_from_ct : torch.Tensor
            ``(4, 4)`` registered pose, mm.

        Returns
        -------
        dict
            ``gc`` (at the pose), ``neighbours`` (``{name: gc}``), ``best`` (the best neighbour's
            name) and ``ratio`` (its gc over the pose's; ``inf`` when the pose's gc is not positive,
            0 when no neighbour reaches :data:`MIN_EVIDENCE_GC`: no evidence for a neighbour).
        """
        cands = self.candidates(T_optical_from_ct)
        lv, fixed = _frame_at(image_att, intrinsics, self.size_px)
        gcs = _whole_view_gc(self.renderer, fixed, lv, torch.stack(list(cands.values())))
        own = gcs[0]
        neighbours = dict(zip(list(cands)[1:], gcs[1:]))
        best = max(neighbours, key=neighbours.get)
        if neighbours[best] < MIN_EVIDENCE_GC:
            ratio = 0.0  # nothing in the field of view fits a neighbour: no evidence of a lock
        else:
            ratio = neighbours[best] / own if own > 0 else float("inf")
        return {"gc": own, "neighbours": neighbours, "best": best, "ratio": ratio}


def whole_ct_renderer(ct, step_factor: float = 2.0):
    """A renderer of the whole CT as the X-rays see it, its ray step scaled by ``step_factor`` (speed)."""
    from ..sim.physics import xray_renderer

    renderer = xray_renderer(ct)
    renderer.step_mm *= float(step_factor)
    return renderer


def _frame_at(image_att: np.ndarray, intrinsics: CArmIntrinsics, size_px: int):
    """``(intrinsics, (h, w) float32 frame)`` of the frame scaled so that its longer side has at most ``size_px`` pixels."""
    lv = intrinsics.scaled(min(1.0, size_px / max(intrinsics.height, intrinsics.width)))
    fixed = torch.nn.functional.interpolate(torch.as_tensor(np.asarray(image_att, dtype=np.float32))[None, None],
                                            size=(lv.height, lv.width), mode="area")[0, 0]
    return lv, fixed


def _whole_view_gc(renderer, fixed: torch.Tensor, lv: CArmIntrinsics, poses: torch.Tensor) -> list:
    """Gradient correlation of the whole CT's DRR at each of ``poses`` ``(N, 4, 4)`` with ``fixed`` (a :func:`_frame_at` pair)."""
    from ..intensity.metrics import gradient_correlation

    with torch.no_grad():
        drr = renderer.render(poses, lv.K(torch.float64), lv.height, lv.width).line_integral
        return gradient_correlation(drr, fixed).tolist()


#: Depth search: spacing of the profile's fine samples (mm) and the frame size it is computed at
#: (pixels). An exploration at the true pose of the tuning frames (T7, T9, T11; randomised physics
#: and DiffDRR) found the profile at 128 px peaking within 2 mm of the true depth in 17 of 18
#: frames, at 64 px off by 4-40 mm in 5 of 18. ``benchmarks/depth_profile.py`` measures the search
#: as built (``benchmarks/results/depth_profile.md``): from starts 0 and +-20 mm off in depth, every
#: accepted search on the tuning frames ends within 2.0 mm of the truth; held-out DiffDRR frames
#: within 0.6 mm, held-out randomised frames 27 of 36 within 5 mm and 3 more than 10 mm off (all T12
#: AP, a frame whose correlation is 0.18 at the truth: twice a wrong peak, once declined).
DEPTH_STEP_MM = 4.0
DEPTH_SIZE_PX = 128

#: The profile's prominence is its peak's relative height above the samples this far either side
#: (a multiple of the coarse spacing, ``2 * DEPTH_STEP_MM``), mm.
PROMINENCE_AT_MM = 24.0


def along_ray(T_optical_from_ct: torch.Tensor, center_ct_mm: torch.Tensor, offset_mm: float) -> torch.Tensor:
    """The pose moved ``offset_mm`` along the ray through ``center_ct_mm`` (away from the source when positive).

    The projection of the centre stays where it is; only the depth (and so the magnification)
    changes. ``T_optical_from_ct`` ``(4, 4)`` float64, mm; ``center_ct_mm`` ``(3,)``.
    """
    T = torch.as_tensor(T_optical_from_ct, dtype=torch.float64)
    c = torch.as_tensor(center_ct_mm, dtype=torch.float64)
    p = T[:3, :3] @ c + T[:3, 3]
    S = torch.eye(4, dtype=torch.float64)
    S[:3, 3] = float(offset_mm) * p / p.norm()
    return S @ T


class DepthSearch:
    """The depth of a pose along the ray through the target, read from the whole field of view.

    A single view observes depth only through magnification: SCR-PnP's error is mostly along the
    beam (median SCR mRPD 2 mm against mTRE 10 mm on the held-out first frames), and PPC, which
    holds depth near its start, does not fix it. The whole CT's DRR (spine, ribs, the edges of the
    anatomy over the whole detector) scales with depth; its gradient correlation with the frame,
    sampled every ``2 * DEPTH_STEP_MM`` over ``+-range_mm`` and every :data:`DEPTH_STEP_MM` around
    its best sample (a parabola through the best fine sample and its neighbours gives the peak),
    peaks at the true depth when the frame has enough structure. A flat profile (its peak less
    than ``min_prominence`` above the coarse samples :data:`PROMINENCE_AT_MM` either side,
    relative) or a peak at the range's end says nothing, and the depth stays.

    Parameters
    ----------
    renderer : DRRRenderer
        Renderer of the whole CT (:func:`whole_ct_renderer`).
    center_ct_mm : np.ndarray
        ``(3,)`` float64, the target's centre in the CT frame (mm): the ray the pose moves along.
    """

    def __init__(self, renderer, center_ct_mm):
        self.renderer = renderer
        self.center_ct_mm = torch.as_tensor(np.asarray(center_ct_mm, dtype=np.float64))

    def __call__(self, image_att: np.ndarray, intrinsics: CArmIntrinsics, T_optical_from_ct: torch.Tensor, range_mm: float,
                 min_prominence: float) -> dict:
        """Profile the depth of ``T_optical_from_ct`` ``(4, 4)`` on the frame ``image_att`` ``(H, W)`` over ``+-range_mm``.

        ``min_prominence``: the profile's smallest relative prominence that moves the pose.

        Returns
        -------
        dict
            ``offset_mm`` (the profile's sub-sample peak, mm along the ray; 0 when not accepted),
            ``accepted`` (bool), ``why`` (empty, or why the depth stays), ``prominence``,
            ``gc`` (at the pose) and ``peak_gc``.
        """
        lv, fixed = _frame_at(image_att, intrinsics, DEPTH_SIZE_PX)

        def profile(offs):
            poses = torch.stack([along_ray(T_optical_from_ct, self.center_ct_mm, d) for d in offs])
            return dict(zip(offs, _whole_view_gc(self.renderer, fixed, lv, poses)))

        # coarse: every 2 steps over the range; fine: the steps either side of the coarse peak (its
        # coarse neighbours, 2 steps away, complete the parabola's three samples)
        n = max(1, int(round(range_mm / (2 * DEPTH_STEP_MM))))
        g = profile([float(2 * DEPTH_STEP_MM * k) for k in range(-n, n + 1)])
        coarse = sorted(g)
        best = max(coarse, key=g.get)
        k_side = max(1, int(round(PROMINENCE_AT_MM / (2 * DEPTH_STEP_MM))))
        i = coarse.index(best)
        side = max(g[coarse[max(0, i - k_side)]], g[coarse[min(len(coarse) - 1, i + k_side)]])
        prominence = float((g[best] - side) / g[best]) if g[best] > 0 else 0.0
        out = {"offset_mm": 0.0, "accepted": False, "why": "", "prominence": round(prominence, 4), "gc": float(g[0.0]), "peak_gc": float(g[best])}
        if i in (0, len(coarse) - 1):
            out["why"] = f"the profile peaks at the end of the +-{range_mm:.0f} mm range"
        elif g[best] <= 0 or prominence < min_prominence:
            out["why"] = f"flat profile (prominence {prominence:.3f} < {min_prominence})"
        else:
            g.update(profile([best - DEPTH_STEP_MM, best + DEPTH_STEP_MM]))
            fine = max((best - DEPTH_STEP_MM, best, best + DEPTH_STEP_MM), key=g.get)
            a, b, c = g[fine - DEPTH_STEP_MM], g[fine], g[fine + DEPTH_STEP_MM]
            den = a - 2 * b + c
            frac = 0.5 * (a - c) / den if den < 0 else 0.0
            out.update(offset_mm=float(fine + DEPTH_STEP_MM * float(np.clip(frac, -0.5, 0.5))), accepted=True, peak_gc=float(g[fine]))
        out["renders"] = len(g)
        return out


__all__ = ["DEPTH_SIZE_PX", "DEPTH_STEP_MM", "MIN_EVIDENCE_GC", "PROMINENCE_AT_MM", "SPINE", "DepthSearch", "NeighbourCheck", "along_ray", "whole_ct_renderer"]
