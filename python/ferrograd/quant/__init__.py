"""Post-training weight quantization: W4 (round to nearest, groups) and SmoothQuant+."""

from ..ops.w4a16 import W4Weight, quantize_w4
from .smoothquant import SmoothQuantReport, smoothquant_plus

__all__ = ["SmoothQuantReport", "W4Weight", "quantize_w4", "smoothquant_plus"]
