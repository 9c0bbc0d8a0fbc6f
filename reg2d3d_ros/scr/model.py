"""The SCR initialiser: a trained U-Net plus PnP, saved and loaded safely.

Model file (``scr.pt``): ``torch.save`` of a plain dict ``{"format": "reg2d3d_scr", "version": 1,
"meta_json": str, "state_dict": {name: tensor}}``, loaded with ``torch.load(weights_only=True)``
(no arbitrary unpickling). ``meta_json`` holds the network widths and stride, the input size,
the scene normalisation, the C-arm it was trained for and how it was trained. An ONNX export
of the same network (``scr.onnx``) serves the ONNX Runtime and TensorRT back-ends.

Conventions: frames are attenuation-like ``(H, W)`` images (see :mod:`reg2d3d_ros.images`),
resized to ``size x size`` by area averaging; output pixel ``(i, j)`` of the stride-``s`` network
belongs to input pixel ``(s i + s // 2, s j + s // 2)``, which maps back to the frame by the
pixel-centre convention ``u_frame = (u_in + 0.5) W / size - 0.5``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..engines import NetworkSpec, register_format
from ..errors import ModelLoadError
from .data import SceneNormalisation, normalise_frame, resize_frame
from .loss import split_prediction
from .pnp import PnPResult, select_correspondences, solve_pnp

FORMAT = "reg2d3d_scr"
VERSION = 1


@dataclass
class SCRResult:
    """Outcome of :meth:`SCRInitializer.initialise`.

    Attributes
    ----------
    T_optical_from_ct : torch.Tensor or None
        ``(4, 4)`` float64 pose, mm, or None when no pose could be computed.
    accepted : bool
        Whether the pose passes the confidence thresholds (see :class:`SCRAcceptance`).
    confidence : float
        RANSAC inlier fraction.
    why : str
        Why the pose was rejected ('' when accepted).
    pnp : PnPResult
        The PnP details.
    network_seconds, pnp_seconds : float
        Time of the two stages.
    n_confident : int
        Confident correspondences before thinning.
    """

    T_optical_from_ct: torch.Tensor | None
    accepted: bool
    confidence: float
    why: str
    pnp: PnPResult
    network_seconds: float
    pnp_seconds: float
    n_confident: int


@dataclass(frozen=True)
class SCRAcceptance:
    """Thresholds of the SCR initialisation.

    Attributes
    ----------
    max_log_sigma : float
        Predicted log standard deviation (network units) below which a pixel's scene coordinate is used.
    max_points : int
        Correspondences given to RANSAC (after thinning).
    reprojection_px_at_256 : float
        RANSAC inlier threshold in pixels of a 256-pixel-wide frame (scaled with the frame width).
    min_inliers : int
        Fewer inliers reject the pose.
    min_inlier_fraction : float
        A lower inlier fraction rejects the pose.
    """

    max_log_sigma: float = -2.5
    max_points: int = 600
    reprojection_px_at_256: float = 3.0
    min_inliers: int = 40
    min_inlier_fraction: float = 0.35


class SCRInitializer:
    """Scene coordinate regression + RANSAC PnP for one patient's CT.

    Parameters
    ----------
    net : torch.nn.Module
        The U-Net (``(B, 1, size, size)`` -> ``(B, 8, size / stride, size / stride)``).
    meta : dict
        Model metadata (see module docstring); ``size``, ``stride``, ``center_ct_mm``, ``scale_mm`` are used.
    acceptance : SCRAcceptance, optional
        Thresholds.
    runner : callable, optional
        ``(B, 1, size, size) float32 numpy -> (B, 8, h, w) numpy``; replaces ``net`` for
        inference (ONNX Runtime / TensorRT back-ends, :mod:`reg2d3d_ros.engines`).
    """

    def __init__(self, net, meta: dict, acceptance: SCRAcceptance | None = None, runner=None):
        self.net = net.eval() if net is not None else None
        self.meta = dict(meta)
        self.size = int(meta["size"])
        self.stride = int(meta["stride"])
        self.norm = SceneNormalisation(tuple(meta["center_ct_mm"]), float(meta["scale_mm"]))
        self.acceptance = acceptance or SCRAcceptance()
        self.runner = runner

    # -- files -----------------------------------------------------------------------------
    def save(self, path) -> None:
        """Write the model file (state dict + metadata; no pickled objects)."""
        sd = {k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}
        torch.save({"format": FORMAT, "version": VERSION, "meta_json": json.dumps(self.meta), "state_dict": sd}, Path(path))

    @classmethod
    def load(cls, path, device: str = "cpu", acceptance: SCRAcceptance | None = None) -> "SCRInitializer":
        """Load a model file; raises :class:`ModelLoadError` with the reason if it is unusable."""
        from ..nets import UNet

        from ..engines import read_model_blob

        blob = read_model_blob(path, FORMAT, VERSION, "SCR model", "create it with python -m reg2d3d_ros.prepare")
        try:
            meta = json.loads(blob["meta_json"])
            net = UNet(1, 8, widths=meta["widths"], stride=meta["stride"])
            net.load_state_dict(blob["state_dict"])
        except Exception as exc:
            raise ModelLoadError(f"SCR model {path} does not match the network ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
        return cls(net.to(device), meta, acceptance)

    # -- inference -------------------------------------------------------------------------
    def network_input(self, att: np.ndarray | torch.Tensor) -> torch.Tensor:
        """``(H, W)`` attenuation frame -> ``(1, 1, size, size)`` float32 standardised input."""
        x = torch.as_tensor(np.asarray(att, dtype=np.float32))[None, None]
        return normalise_frame(resize_frame(x, self.size))

    def predict(self, att) -> torch.Tensor:
        """Raw network output ``(8, h, w)`` float32 for one frame."""
        x = self.network_input(att)
        if self.runner is not None:
            return torch.from_numpy(np.asarray(self.runner(x.numpy())))[0].float()
        dev = next(self.net.parameters()).device
        with torch.no_grad():
            return self.net(x.to(dev))[0].float().cpu()

    def output_pixels(self, frame_height: int, frame_width: int) -> torch.Tensor:
        """``(h, w, 2)`` frame pixel coordinates ``(u, v)`` of the output grid."""
        h = w = self.size // self.stride
        off = self.stride // 2
        iu = (torch.arange(w, dtype=torch.float64) * self.stride + off + 0.5) * frame_width / self.size - 0.5
        iv = (torch.arange(h, dtype=torch.float64) * self.stride + off + 0.5) * frame_height / self.size - 0.5
        return torch.stack(torch.meshgrid(iu, iv, indexing="xy"), dim=-1)

    def initialise(self, att, K, seed: int = 0) -> SCRResult:
        """Pose of one frame.

        Parameters
        ----------
        att : np.ndarray
            ``(H, W)`` attenuation-like frame.
        K : array-like
            ``(3, 3)`` frame intrinsics, pixels.
        """
        a = self.acceptance
        H, W = np.asarray(att).shape
        t0 = time.perf_counter()
        pred = self.predict(att)
        t_net = time.perf_counter() - t0
        mean, s = split_prediction(pred[None])
        mean_ct = self.norm.denormalise(mean[0].permute(0, 2, 3, 1).double())  # (2, h, w, 3)
        pts, uv, _ = select_correspondences(mean_ct, s[0], self.output_pixels(H, W), a.max_log_sigma, a.max_points)
        n_conf = int((s[0] < a.max_log_sigma).sum())
        res = solve_pnp(pts, uv, np.asarray(K, dtype=np.float64), a.reprojection_px_at_256 * W / 256.0, seed=seed)
        why = ""
        if res.T_optical_from_ct is None:
            why = f"SCR: PnP failed ({len(pts)} confident correspondences)"
        elif res.n_inliers < a.min_inliers:
            why = f"SCR: {res.n_inliers} PnP inliers < {a.min_inliers}"
        elif res.inlier_fraction < a.min_inlier_fraction:
            why = f"SCR: PnP inlier fraction {res.inlier_fraction:.2f} < {a.min_inlier_fraction}"
        return SCRResult(res.T_optical_from_ct, not why, res.inlier_fraction, why, res, t_net, res.seconds, n_conf)


def networks(path) -> dict:
    """``{"scr": NetworkSpec}`` of an ``scr.pt`` (:mod:`reg2d3d_ros.engines`)."""
    m = SCRInitializer.load(path)
    s = m.size
    return {"scr": NetworkSpec("scr", m.net.eval(), {"image": (1, 1, s, s)}, {"image": "float32"}, ("scene",))}


register_format(FORMAT, networks)
