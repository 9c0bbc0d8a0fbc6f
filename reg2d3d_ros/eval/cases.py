"""Simulated single-vertebra registration cases (van de Kraats protocol) from a CT.

A *case* is one simulated X-ray frame of the whole CT (overlapping anatomy, degradations) with
its ground-truth pose, looking at one target vertebra from a named view with a random jitter of
the C-arm angles and isocentre, plus a set of start poses whose initial mTRE is spread evenly
over ``[0, max_mtre_mm]``. Target points are the vertebra's voxel centres (subsampled).

Two disjoint case sets are defined so that nothing is tuned on the cases it is evaluated on:
:data:`TUNING` (vertebrae T7, T9, T11; seeds from 1000) and :data:`TEST` (T6, T8, T10, T12; seeds
from 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ConfigError
from ..images import to_attenuation
from ..sim import CArmSetup, XrayDegradation, simulate_sequence, structure_center, view_pose, xray_renderer
from ..volume import resolve_label
from .starts import random_starts


@dataclass(frozen=True)
class CaseSet:
    """Which cases to generate."""

    name: str
    vertebrae: tuple
    views: tuple = ("ap", "lateral")
    seed: int = 0
    jitter_deg: float = 5.0
    jitter_mm: float = 10.0
    #: ``nominal``: the simulator's default physics (one setting, :class:`~reg2d3d_ros.sim.XrayDegradation`);
    #: ``randomised``: a domain draw per case (:mod:`reg2d3d_ros.sim.randomize`, seeded by the case).
    physics: str = "nominal"


TEST = CaseSet("test", ("T6", "T8", "T10", "T12"), seed=0)
TUNING = CaseSet("tuning", ("T7", "T9", "T11"), seed=1000)


@dataclass
class Case:
    """One simulated frame with ground truth and start poses."""

    vertebra: str
    view: str
    image_att: np.ndarray
    T_gt: torch.Tensor
    starts: torch.Tensor
    initial_mtre: torch.Tensor
    target_pts: torch.Tensor
    intrinsics: object
    seed: int


def make_cases(ct, case_set: CaseSet, n_starts: int, max_mtre_mm: float = 30.0, setup: CArmSetup = CArmSetup(),
               degradation: XrayDegradation | None = None, renderer=None, progress: bool = False) -> list:
    """Generate the cases of a case set (deterministic given the seeds)."""
    if case_set.physics not in ("nominal", "randomised"):
        raise ConfigError(f"physics must be nominal or randomised, got {case_set.physics!r}")
    renderer = renderer or (xray_renderer(ct) if case_set.physics == "nominal" else None)
    degradation = degradation or XrayDegradation()
    cases = []
    k = 0
    for vert in case_set.vertebrae:
        lid = resolve_label(vert, ct.label_names)
        center = structure_center(ct, vert)
        pts = torch.from_numpy(ct.label_points_ct_mm([lid], max_points=1000, seed=0))
        for view in case_set.views:
            seed = case_set.seed + k
            k += 1
            rng = np.random.default_rng(seed)
            from .. import sim

            lao, cran = sim.VIEWS[view]
            angles = (lao + rng.uniform(-1, 1) * case_set.jitter_deg, cran + rng.uniform(-1, 1) * case_set.jitter_deg)
            offset = rng.uniform(-1, 1, size=3) * case_set.jitter_mm
            T_gt = view_pose(center, setup, angles, offset_mm=offset)
            if case_set.physics == "randomised":
                from ..sim import randomize as rz

                comps = rz.render_components(ct, setup.intrinsics(), T_gt[None])
                draw = rz.draw_domain(np.random.default_rng((seed, 7)))
                seq = rz.simulate_randomised_sequence(comps, T_gt[None], setup.intrinsics(), draw, seed=seed)
            else:
                seq = simulate_sequence(renderer, setup.intrinsics(), T_gt[None], degradation, seed=seed)
            img = to_attenuation(seq.images[0].astype(np.float32), seq.intensity)
            starts, e0 = random_starts(T_gt, pts, n_starts, max_mtre_mm=max_mtre_mm, seed=seed)
            cases.append(Case(vert, view, img, T_gt, starts, e0, pts, setup.intrinsics(), seed))
            if progress:
                print(f"  case {vert} {view}: {n_starts} starts", flush=True)
    return cases
