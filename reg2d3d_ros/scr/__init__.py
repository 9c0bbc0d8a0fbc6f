"""Scene coordinate regression + RANSAC PnP: the first-frame initialiser (Shrestha et al., MICCAI 2023).

- :mod:`.data`: training views of the patient's CT, scene coordinates, degradations;
- :mod:`.loss`: the Gaussian NLL / non-existent-coordinate loss;
- :mod:`.pnp`: confident-pixel selection and OpenCV RANSAC PnP;
- :mod:`.model`: :class:`SCRInitializer` (network + PnP, model file);
- :mod:`.train`: resumable training (and the pose-regression baseline).

Frames and units follow :mod:`reg2d3d_ros.geometry`: CT frame in mm, ``T_optical_from_ct``.
"""

from .model import SCRAcceptance, SCRInitializer, SCRResult
from .pnp import PnPResult, select_correspondences, solve_pnp

__all__ = ["PnPResult", "SCRAcceptance", "SCRInitializer", "SCRResult", "select_correspondences", "solve_pnp"]
