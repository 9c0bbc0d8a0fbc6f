"""Point-to-plane correspondence (PPC) registration: surface points, contours, NGC matching,
the PPC solver (weighted least squares and MCCR) and iterative registration / tracking."""

from .contours import Contours, select_contours
from .matching import gradient_image, ngc_search
from .register import TRACKING_CONFIG, WANG_CONFIG, PPCConfig, PPCRegistrator, RegistrationResult
from .solver import NO_DEPTH, PPCSolution, motion_about, ppc_equations, solve_ppc, solve_weighted
from .surface import SurfacePoints, canny_surface_points, structure_region

__all__ = [
    "Contours",
    "select_contours",
    "gradient_image",
    "ngc_search",
    "TRACKING_CONFIG",
    "WANG_CONFIG",
    "PPCConfig",
    "PPCRegistrator",
    "RegistrationResult",
    "NO_DEPTH",
    "PPCSolution",
    "motion_about",
    "ppc_equations",
    "solve_ppc",
    "solve_weighted",
    "SurfacePoints",
    "canny_surface_points",
    "structure_region",
]
