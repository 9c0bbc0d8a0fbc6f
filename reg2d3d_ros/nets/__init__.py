"""Networks (pure PyTorch, no torchvision), the building blocks of the learned methods: the SCR U-Net
and the pose-regression baseline (:mod:`reg2d3d_ros.scr`), the correspondence-weighting PointNet
(:mod:`reg2d3d_ros.ppcl`, PPC Flow Attention), the FlowNetC-style flow network
(:mod:`reg2d3d_ros.ppcflow`), the learned similarity (:mod:`reg2d3d_ros.similarity`), complexity counts.

Tensors are batch-first ``(B, C, H, W)`` float32 images; outputs follow the input's device and dtype.
"""

from .complexity import count_macs, count_parameters
from .flownet import FlowNetC
from .pointnet import CorrespondenceWeightNet, modified_softsign
from .posenet import PoseRegressionNet
from .similarity import SimilarityNet
from .unet import UNet

__all__ = ["CorrespondenceWeightNet", "FlowNetC", "modified_softsign", "PoseRegressionNet", "SimilarityNet", "UNet", "count_macs", "count_parameters"]
