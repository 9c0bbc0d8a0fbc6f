"""Differentiable DRR rendering, bone-surface crossings (scene coordinates) and image gradients."""

from .gradients import downsample, image_gradients
from .renderer import DRROutput, DRRRenderer

__all__ = ["DRROutput", "DRRRenderer", "downsample", "image_gradients"]
