"""Classic point-to-plane correspondence (PPC) registration: surface points, contours, NGC matching,
the PPC solver (weighted least squares and MCCR) and iterative registration / tracking
(:mod:`.register`); :mod:`.search` is the global in-plane search that starts a registration from
a rough pose. The learned update operators around the solver are methods of their own:
:mod:`reg2d3d_ros.ppcl` (PPC-L correspondence weighting) and :mod:`reg2d3d_ros.ppcflow` (PPC Flow /
PPC Flow Attention); the registrator takes their weighter and matcher."""

from .contours import Contours, select_contours
from .matching import gradient_image, ngc_search
from .register import PPCL_CONFIG, PPCL_HYBRID_CONFIG, PPCL_PLUS_CONFIG, TRACKING_CONFIG, WANG_CONFIG, Correspondences, PPCConfig, PPCRegistrator, RegistrationResult
from .search import InPlaneCandidate, inplane_search, ngc_map
from .solver import NO_DEPTH, PPCSolution, motion_about, ppc_equations, solve_ppc, solve_weighted
from .surface import SurfacePoints, canny_surface_points

__all__ = [
    "Contours",
    "select_contours",
    "gradient_image",
    "ngc_search",
    "TRACKING_CONFIG",
    "WANG_CONFIG",
    "PPCL_CONFIG",
    "PPCL_PLUS_CONFIG",
    "PPCL_HYBRID_CONFIG",
    "Correspondences",
    "PPCConfig",
    "PPCRegistrator",
    "RegistrationResult",
    "InPlaneCandidate",
    "inplane_search",
    "ngc_map",
    "NO_DEPTH",
    "PPCSolution",
    "motion_about",
    "ppc_equations",
    "solve_ppc",
    "solve_weighted",
    "SurfacePoints",
    "canny_surface_points",
]
