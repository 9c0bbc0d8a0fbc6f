"""PPC Flow and PPC Flow Attention: a learned update operator around the PPC solver (a FlowNetC-style
flow network for the correspondences, optionally a PointNet that weights them).

- :mod:`.model` (run time): the attention features, :class:`FlowOperator` (the networks of
  ``ppcflow.pt``; the matcher and weighter the PPC update calls), the model file's format;
- :mod:`.train` (training): training samples, one learned update and its losses, the training of
  each kind and ``python -m reg2d3d_ros.ppcflow.train``.

The networks are :class:`reg2d3d_ros.nets.FlowNetC` and :class:`reg2d3d_ros.nets.CorrespondenceWeightNet`;
the pipeline's tracker ``ppc_flow_plus`` uses the operator at the coarsest level.
"""

from .model import FORMAT, KINDS, N_FEATURES, FlowOperator, attention_features

__all__ = ["FORMAT", "KINDS", "N_FEATURES", "FlowOperator", "attention_features"]
