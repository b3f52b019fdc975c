"""Post-training weight quantization: W4 (round to nearest, groups) and SmoothQuant+."""

from .w4 import W4Weight, quantize_w4

__all__ = ["W4Weight", "quantize_w4"]
