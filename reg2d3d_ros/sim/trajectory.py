"""Pose trajectories of simulated fluoroscopy sequences (conventions: :mod:`reg2d3d_ros.geometry`).

Every generator returns ``(F, 4, 4)`` float64 ``T_optical_from_ct`` poses in mm. Patient motion
is a rigid motion ``M_t`` of the CT about an anatomical centre ``c`` (e.g. the vertebra's
centroid), applied as ``T_t = T_0 @ Tr(c) @ exp(xi_t) @ Tr(-c)``; C-arm motion changes the
C-arm angles about its isocentre.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import ConfigError
from ..geometry.camera import carm_pose
from ..geometry.se3 import se3_exp


def _about_center(xi: torch.Tensor, center_ct_mm) -> torch.Tensor:
    """``(F, 4, 4)`` motions ``Tr(c) exp(xi) Tr(-c)`` of twists ``(F, 6)`` (rad, mm)."""
    c = torch.as_tensor(np.asarray(center_ct_mm, dtype=np.float64))
    M = se3_exp(xi)
    R = M[:, :3, :3]
    M[:, :3, 3] = M[:, :3, 3] + c - (R @ c)
    return M


def static(T0: torch.Tensor, n_frames: int) -> torch.Tensor:
    """The same pose for every frame."""
    return T0.to(torch.float64).expand(n_frames, 4, 4).clone()


def smooth_patient_motion(
    T0: torch.Tensor,
    n_frames: int,
    center_ct_mm,
    fps: float = 15.0,
    breathing_mm: float = 2.0,
    breathing_hz: float = 0.25,
    drift_mm: float = 3.0,
    drift_deg: float = 2.0,
    seed: int = 0,
) -> torch.Tensor:
    """Breathing plus slow smooth drift of the patient.

    Parameters
    ----------
    T0 : torch.Tensor
        ``(4, 4)`` pose of the first frame, mm.
    n_frames : int
        Number of frames.
    center_ct_mm : sequence of 3 float
        Centre of the patient motion, CT frame, mm.
    fps : float
        Frame rate, Hz.
    breathing_mm : float
        Peak breathing amplitude (mostly cranio-caudal, CT z; a third of it antero-posterior).
    breathing_hz : float
        Breathing frequency, Hz.
    drift_mm, drift_deg : float
        Peak amplitude of the slow drift (translation per axis, rotation per axis); the drift is
        a sum of three low-frequency sinusoids per axis with random phases, zero at frame 0.
    seed : int
        Random seed for the drift.
    """
    if n_frames < 1:
        raise ConfigError("n_frames must be >= 1")
    rng = np.random.default_rng(seed)
    t = np.arange(n_frames) / fps
    xi = np.zeros((n_frames, 6))
    breath = breathing_mm * 0.5 * (1 - np.cos(2 * math.pi * breathing_hz * t))
    xi[:, 5] += breath  # CT z (cranio-caudal)
    xi[:, 4] += breath / 3.0  # CT y (antero-posterior)
    duration = max(t[-1], 1.0 / fps)
    for axis in range(6):
        amp = math.radians(drift_deg) if axis < 3 else drift_mm
        freqs = rng.uniform(0.2, 1.0, size=3) / duration  # fewer than ~1 cycle over the sequence
        phases = rng.uniform(0, 2 * math.pi, size=3)
        weights = rng.uniform(0.5, 1.0, size=3)
        weights = weights / weights.sum()
        sig = sum(w * (np.sin(2 * math.pi * f * t + p) - np.sin(p)) for w, f, p in zip(weights, freqs, phases))
        xi[:, axis] += amp * sig / 2.0
    M = _about_center(torch.from_numpy(xi), center_ct_mm)
    return T0.to(torch.float64)[None] @ M


def carm_rotation(
    isocenter_ct_mm,
    sid_mm: float,
    n_frames: int,
    lao_start_deg: float,
    lao_end_deg: float,
    cran_start_deg: float = 0.0,
    cran_end_deg: float = 0.0,
) -> torch.Tensor:
    """C-arm rotating about its isocentre, angles interpolated linearly over the frames."""
    if n_frames < 1:
        raise ConfigError("n_frames must be >= 1")
    s = np.linspace(0.0, 1.0, n_frames)
    return torch.stack(
        [
            carm_pose(
                isocenter_ct_mm,
                sid_mm,
                lao_deg=lao_start_deg + (lao_end_deg - lao_start_deg) * a,
                cran_deg=cran_start_deg + (cran_end_deg - cran_start_deg) * a,
            )
            for a in s
        ]
    )


def sudden_jumps(
    T0: torch.Tensor,
    n_frames: int,
    center_ct_mm,
    jump_frames=(20, 40),
    jump_mm: float = 8.0,
    jump_deg: float = 4.0,
    jitter_mm: float = 0.2,
    seed: int = 0,
) -> torch.Tensor:
    """Piecewise-constant patient pose with sudden jumps (e.g. the patient is bumped).

    At each frame in ``jump_frames`` the pose changes by a random motion with translation
    norm ``jump_mm`` and rotation norm ``jump_deg``; between jumps only a small jitter.
    """
    rng = np.random.default_rng(seed)
    xi = np.zeros((n_frames, 6))
    current = np.zeros(6)
    jumps = set(int(f) for f in jump_frames)
    for f in range(n_frames):
        if f in jumps:
            w = rng.normal(size=3)
            v = rng.normal(size=3)
            current = current + np.concatenate(
                [w / np.linalg.norm(w) * math.radians(jump_deg), v / np.linalg.norm(v) * jump_mm]
            )
        xi[f] = current
        xi[f, 3:] += rng.normal(scale=jitter_mm, size=3) if f > 0 else 0.0
    M = _about_center(torch.from_numpy(xi), center_ct_mm)
    return T0.to(torch.float64)[None] @ M


TRAJECTORIES = ("static", "smooth", "carm_rotation", "jumps")
