"""Post-training weight quantization: W4 (round to nearest, groups) and SmoothQuant+."""

from .smoothquant import SmoothQuantReport, smoothquant_plus
from .w4 import W4Weight, quantize_w4

__all__ = ["SmoothQuantReport", "W4Weight", "quantize_w4", "smoothquant_plus"]
