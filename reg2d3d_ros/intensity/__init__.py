"""Intensity-based 2D/3D registration: differentiable similarity metrics (NCC, gradient
correlation, multi-scale NCC) and coarse-to-fine gradient ascent through the differentiable DRR
renderer, with an optional CMA-ES refinement (:mod:`.register`). The correlation-driven learned
similarity (``metric="learned"``) is its own method, :mod:`reg2d3d_ros.similarity`."""

from .metrics import METRICS, get_metric, gradient_correlation, multiscale_ncc, ncc
from .register import ALL_DOF, IN_PLANE_DOF, NO_DEPTH_DOF, IntensityConfig, IntensityRegistrator, IntensityResult, perturb_about

__all__ = [
    "METRICS",
    "get_metric",
    "gradient_correlation",
    "multiscale_ncc",
    "ncc",
    "ALL_DOF",
    "IN_PLANE_DOF",
    "NO_DEPTH_DOF",
    "IntensityConfig",
    "IntensityRegistrator",
    "IntensityResult",
    "perturb_about",
]
