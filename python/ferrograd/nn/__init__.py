"""Modules built on ferrograd's primitives."""

from .l1norm import L1LayerNorm
from .shiftquant import ShiftQuantLinear, quantize_model

__all__ = ["L1LayerNorm", "ShiftQuantLinear", "quantize_model"]
