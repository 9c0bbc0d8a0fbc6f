"""Networks (pure PyTorch, no torchvision): the SCR U-Net, the pose-regression baseline, the
PPC-L correspondence-weighting PointNet, the learned similarity, complexity counts.

Tensors are batch-first ``(B, C, H, W)`` float32 images; outputs follow the input's device and dtype.
"""

from .complexity import count_macs, count_parameters
from .pointnet import CorrespondenceWeightNet, modified_softsign
from .posenet import PoseRegressionNet
from .similarity import SimilarityNet
from .unet import UNet

__all__ = ["CorrespondenceWeightNet", "modified_softsign", "PoseRegressionNet", "SimilarityNet", "UNet", "count_macs", "count_parameters"]
