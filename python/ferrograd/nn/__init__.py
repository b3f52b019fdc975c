"""Modules built on ferrograd's primitives."""

from .cce import LinearCrossEntropy
from .fsdp import compress_all_gather
from .l1norm import L1LayerNorm, L1RMSNorm
from .shiftquant import ShiftQuantLinear, quantize_model
from .w4a16 import W4A16Linear

__all__ = [
    "L1LayerNorm",
    "L1RMSNorm",
    "LinearCrossEntropy",
    "ShiftQuantLinear",
    "W4A16Linear",
    "compress_all_gather",
    "quantize_model",
]
