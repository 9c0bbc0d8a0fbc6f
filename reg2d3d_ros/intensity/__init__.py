"""Intensity-based 2D/3D registration: differentiable similarity metrics (NCC, gradient
correlation, multi-scale NCC) and coarse-to-fine gradient ascent through the differentiable DRR
renderer, with an optional CMA-ES refinement (:mod:`.register`), and the correlation-driven
learned similarity (:mod:`.learned`)."""

from .learned import LearnedSimilarity
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
    "LearnedSimilarity",
    "perturb_about",
]
