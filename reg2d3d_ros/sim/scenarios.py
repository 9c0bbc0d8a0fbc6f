"""Standard simulated set-ups: the C-arm, named views and pose trajectories around a vertebra."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ConfigError
from ..geometry.camera import CArmIntrinsics, carm_pose
from ..volume import resolve_label
from . import objects as obj
from . import trajectory as traj

#: Named C-arm views: (LAO deg, cranial deg).
VIEWS = {"ap": (0.0, 0.0), "lateral": (90.0, 0.0), "oblique": (35.0, 10.0), "rao": (-30.0, 0.0)}


@dataclass(frozen=True)
class CArmSetup:
    """A mobile flat-panel C-arm.

    Attributes
    ----------
    sdd_mm : float
        Source-to-detector distance, mm.
    sid_mm : float
        Source-to-isocentre distance, mm.
    pixel_spacing_mm : float
        Detector pixel pitch at the simulated resolution, mm.
    width, height : int
        Image size, pixels.
    """

    sdd_mm: float = 1020.0
    sid_mm: float = 680.0
    pixel_spacing_mm: float = 1.2
    width: int = 256
    height: int = 256

    def intrinsics(self) -> CArmIntrinsics:
        """Pinhole intrinsics of the detector."""
        return CArmIntrinsics.from_detector(self.sdd_mm, self.pixel_spacing_mm, self.width, self.height)

    def at_size(self, size: int) -> "CArmSetup":
        """Same detector area sampled with ``size x size`` pixels."""
        return CArmSetup(self.sdd_mm, self.sid_mm, self.pixel_spacing_mm * self.width / size, size, size)


def structure_center(ct, name) -> np.ndarray:
    """Centroid ``(3,)`` of a labelled structure (e.g. ``"T8"``), CT frame, mm."""
    lid = resolve_label(name, ct.label_names)
    kji = np.argwhere(ct.label_mask([lid]))
    if len(kji) == 0:
        raise ConfigError(f"structure {name} (label {lid}) is empty in {ct.source}")
    return ct.ijk_to_ct(kji[:, ::-1].mean(axis=0, keepdims=True))[0]


def view_pose(center_ct_mm, setup: CArmSetup, view="ap", offset_mm=(0.0, 0.0, 0.0)) -> torch.Tensor:
    """``T_optical_from_ct`` (4, 4, mm) of a named view (or ``(lao, cran)``) centred on a point.

    ``offset_mm`` shifts the isocentre (CT frame), e.g. to place the target off-centre.
    """
    lao, cran = VIEWS[view] if isinstance(view, str) else view
    iso = np.asarray(center_ct_mm, dtype=np.float64) + np.asarray(offset_mm, dtype=np.float64)
    return carm_pose(iso, setup.sid_mm, lao_deg=lao, cran_deg=cran)


def make_trajectory(kind: str, T0: torch.Tensor, n_frames: int, center_ct_mm, setup: CArmSetup, view="ap", fps: float = 15.0, seed: int = 0) -> torch.Tensor:
    """Poses ``(F, 4, 4)`` of a named trajectory starting at ``T0`` (see :mod:`.trajectory`)."""
    if kind == "static":
        return traj.static(T0, n_frames)
    if kind == "smooth":
        return traj.smooth_patient_motion(T0, n_frames, center_ct_mm, fps=fps, seed=seed)
    if kind == "jumps":
        return traj.sudden_jumps(T0, n_frames, center_ct_mm, jump_frames=(n_frames // 3, 2 * n_frames // 3), seed=seed)
    if kind == "carm_rotation":
        lao, cran = VIEWS[view] if isinstance(view, str) else view
        # 0.5 deg per frame about the isocentre, as a slow manual C-arm rotation
        return traj.carm_rotation(center_ct_mm, setup.sid_mm, n_frames, lao, lao + 0.5 * (n_frames - 1), cran, cran)
    raise ConfigError(f"unknown trajectory {kind!r}; choose one of {traj.TRAJECTORIES}")


def make_objects(kind: str, center_ct_mm) -> list:
    """Foreign objects near a target: ``none``, ``wire``, ``screw`` or ``both``."""
    c = np.asarray(center_ct_mm, dtype=np.float64)
    out = []
    if kind in ("wire", "both"):
        # a guide wire running obliquely across the field, anterior to the spine
        s = np.linspace(-1.0, 1.0, 9)[:, None]
        pts = c + np.hstack([60 * s, -45 + 10 * s**2, 70 * s + 10 * np.sin(3 * s)])
        out += obj.wire(pts)
    if kind in ("screw", "both"):
        # a pedicle screw entering the vertebra from posterior-lateral
        out += obj.screw(c + np.array([12.0, 8.0, 3.0]), direction=(0.25, 1.0, 0.05))
    if kind not in ("none", "wire", "screw", "both"):
        raise ConfigError(f"unknown objects {kind!r}; choose none, wire, screw or both")
    return out
