"""Simulated fluoroscopy sequences: render, add objects, degrade, encode.

A :class:`SimulatedSequence` holds encoded frames as they would arrive on ``/carm/image``, the
camera intrinsics, time stamps and the ground-truth ``T_optical_from_ct`` (mm) of every frame.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import ConfigError
from ..geometry.camera import CArmIntrinsics
from .degrade import XrayDegradation, degrade
from .objects import project_cylinders

#: Stamp of the first frame of simulated sequences (ns since the epoch; 2023-11-14T22:13:20Z).
DEFAULT_START_NS = 1_700_000_000 * 10**9


@dataclass
class SimulatedSequence:
    """A simulated sequence.

    Attributes
    ----------
    images : np.ndarray
        ``(F, H, W)`` frames in the encoding's dtype.
    encoding : str
        ``mono8``, ``mono16`` or ``32FC1``.
    intensity : str
        ``attenuation`` or ``transmission`` (what the pixel values mean).
    poses_mm : np.ndarray
        ``(F, 4, 4)`` float64 ground-truth ``T_optical_from_ct``, mm.
    intrinsics : CArmIntrinsics
        Camera of every frame.
    stamps_ns : np.ndarray
        ``(F,)`` int64 time stamps, ns.
    frame_id : str
        Optical frame name of the images.
    meta : dict
        Free-form description (trajectory, degradation, objects, seed).
    """

    images: np.ndarray
    encoding: str
    intensity: str
    poses_mm: np.ndarray
    intrinsics: CArmIntrinsics
    stamps_ns: np.ndarray
    frame_id: str = "carm_optical"
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.images)


def render_line_integrals(renderer, intrinsics: CArmIntrinsics, poses_mm: torch.Tensor, objects=(), batch: int = 1, progress: bool = False) -> np.ndarray:
    """Line-integral images ``(F, H, W)`` float32 of a pose sequence, objects included."""
    K = intrinsics.K(dtype=torch.float64)
    H, W = intrinsics.height, intrinsics.width
    out = np.zeros((len(poses_mm), H, W), dtype=np.float32)
    from ..progress import Bar

    bar = Bar("rendering frames", len(poses_mm), enabled=progress)
    with torch.no_grad(), bar:
        for start in range(0, len(poses_mm), batch):
            T = poses_mm[start : start + batch].to(torch.float64)
            L = renderer.render(T, K, H, W).line_integral.double()
            for b in range(T.shape[0]):
                if objects:
                    L[b] += project_cylinders(objects, T[b], K, H, W)
            out[start : start + T.shape[0]] = L.numpy()
            bar.update(min(start + batch, len(poses_mm)))
    return out


def simulate_sequence(
    renderer,
    intrinsics: CArmIntrinsics,
    poses_mm: torch.Tensor,
    degradation: XrayDegradation | None = None,
    fps: float = 15.0,
    seed: int = 0,
    objects=(),
    frame_id: str = "carm_optical",
    start_ns: int = DEFAULT_START_NS,
    progress: bool = False,
    meta: dict | None = None,
) -> SimulatedSequence:
    """Simulate a fluoroscopy sequence.

    Parameters
    ----------
    renderer : DRRRenderer
        Renderer of the CT that the X-rays see (normally the whole CT, so that overlapping
        anatomy is present).
    intrinsics : CArmIntrinsics
        The C-arm camera.
    poses_mm : torch.Tensor
        ``(F, 4, 4)`` ground-truth ``T_optical_from_ct``, mm.
    degradation : XrayDegradation, optional
        Image formation parameters (default: :class:`XrayDegradation` defaults).
    fps : float
        Frame rate for the stamps, Hz.
    seed : int
        Seed of the noise.
    objects : sequence of Cylinder
        Foreign objects in the CT frame.
    """
    if fps <= 0:
        raise ConfigError("fps must be positive")
    degradation = degradation or XrayDegradation()
    rng = np.random.default_rng(seed)
    L = render_line_integrals(renderer, intrinsics, poses_mm, objects=objects, progress=progress)
    images = np.stack([degrade(L[f], degradation, rng) for f in range(len(L))])
    stamps = start_ns + np.rint(np.arange(len(L)) * 1e9 / fps).astype(np.int64)
    info = dict(meta or {})
    info.update(
        {
            "fps": fps,
            "seed": seed,
            "degradation": dict(vars(degradation)),
            "objects": [vars(o) for o in objects],
        }
    )
    return SimulatedSequence(
        images=images,
        encoding=degradation.encoding,
        intensity=degradation.display,
        poses_mm=poses_mm.detach().cpu().numpy().astype(np.float64),
        intrinsics=intrinsics,
        stamps_ns=stamps,
        frame_id=frame_id,
        meta=info,
    )
