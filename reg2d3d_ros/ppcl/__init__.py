"""PPC-L: PPC with correspondence weights learned through the PPC solver (one PointNet per resolution level).

- :mod:`.model` (run time): the correspondence features, :class:`LearnedWeighting` (the networks
  of ``ppcl.pt``, the weighter the PPC update calls), the model file's format;
- :mod:`.train` (training): training samples, the one-update objective, the per-level training and
  ``python -m reg2d3d_ros.ppcl.train``.

The PPC update itself (:class:`reg2d3d_ros.ppc.PPCRegistrator`) takes the weighter; the
pipeline's trackers ``ppc_l``, ``ppc_l_plus`` and ``ppc_l_hybrid`` use it.
"""

from .model import FORMAT, N_FEATURES, LearnedWeighting, correspondence_features

__all__ = ["FORMAT", "N_FEATURES", "LearnedWeighting", "correspondence_features"]
