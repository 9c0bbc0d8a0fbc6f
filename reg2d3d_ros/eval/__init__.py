"""Evaluation: mTRE, mRPD, projection error, success rate, capture range, start positions."""

from .metrics import capture_range, mrpd, mtre, projection_error_px, summarize
from .starts import perturbation_about, random_starts

__all__ = ["capture_range", "mrpd", "mtre", "projection_error_px", "summarize", "perturbation_about", "random_starts"]
