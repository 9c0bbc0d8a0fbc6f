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
        from ..sim.physics import xray_renderer

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
        renderer = xray_renderer(ct)
        renderer.step_mm *= float(step_factor)
        return cls(renderer, offsets, size_px)

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
        from ..intensity.metrics import gradient_correlation

        lv = intrinsics.scaled(min(1.0, self.size_px / max(intrinsics.height, intrinsics.width)))
        cands = self.candidates(T_optical_from_ct)
        poses = torch.stack(list(cands.values()))
        with torch.no_grad():
            drr = self.renderer.render(poses, lv.K(torch.float64), lv.height, lv.width).line_integral
            fixed = torch.nn.functional.interpolate(torch.as_tensor(np.asarray(image_att, dtype=np.float32))[None, None],
                                                    size=(lv.height, lv.width), mode="area")[0].to(drr.dtype)
            gcs = [float(gradient_correlation(drr[i : i + 1], fixed)) for i in range(len(cands))]
        own = gcs[0]
        neighbours = dict(zip(list(cands)[1:], gcs[1:]))
        best = max(neighbours, key=neighbours.get)
        if neighbours[best] < MIN_EVIDENCE_GC:
            ratio = 0.0  # nothing in the field of view fits a neighbour: no evidence of a lock
        else:
            ratio = neighbours[best] / own if own > 0 else float("inf")
        return {"gc": own, "neighbours": neighbours, "best": best, "ratio": ratio}


__all__ = ["MIN_EVIDENCE_GC", "SPINE", "NeighbourCheck"]
