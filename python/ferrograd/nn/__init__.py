"""Modules built on ferrograd's primitives."""

from .cce import LinearCrossEntropy
from .l1norm import L1LayerNorm
from .shiftquant import ShiftQuantLinear, quantize_model

__all__ = ["L1LayerNorm", "LinearCrossEntropy", "ShiftQuantLinear", "quantize_model"]
