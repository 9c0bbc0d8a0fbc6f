"""The correlation-driven learned similarity: a network trained so that its gradient with respect to
the pose points towards the truth, used as the ``learned`` metric of intensity-based registration.

- :mod:`.model` (run time): :class:`LearnedSimilarity` (the network of ``similarity.pt`` as a
  metric), the model file's format;
- :mod:`.train` (training): pose parameters, cached DRR Jacobians, the gradient-approximation and
  decomposition losses, the training and ``python -m reg2d3d_ros.similarity.train``.

The network is :class:`reg2d3d_ros.nets.SimilarityNet`; the registration that uses the metric is
:class:`reg2d3d_ros.intensity.IntensityRegistrator` (``metric="learned"``).
"""

from .model import FORMAT, LearnedSimilarity

__all__ = ["FORMAT", "LearnedSimilarity"]
