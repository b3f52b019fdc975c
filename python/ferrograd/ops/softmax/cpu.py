"""The Rust kernels on CPU tensors: float32 / bfloat16 / float16 read and written in their own
dtype (computed in float32 in registers); float64 runs the reference."""

from __future__ import annotations

import math

import torch

from ... import _core
from .._checks import KERNEL_DTYPES
from . import reference

# With fewer independent softmaxes side by side than one AVX-512 vector holds, moving the
# softmax dim last (one copy) beats running the strided kernel on partial vectors.
_MIN_LANES = 16


class _Layout:
    """How a tensor and a dim map onto the kernels' [outer, n, inner] view."""

    def __init__(self, shape: torch.Size, dim: int) -> None:
        self.dim = dim
        self.n = shape[dim] if shape else 1  # a 0-d tensor is one softmax of one element
        self.outer = math.prod(shape[:dim])
        inner = math.prod(shape[dim + 1 :])
        self.transpose = 1 < inner < _MIN_LANES
        if self.transpose:
            self.outer, inner = self.outer * inner, 1
        self.inner = inner

    def to_kernel(self, t: torch.Tensor) -> torch.Tensor:
        """A contiguous tensor of at least one dimension in the kernels' layout (no copy if
        already)."""
        if self.transpose:
            t = t.movedim(self.dim, -1)
        elif t.dim() == 0:
            t = t.reshape(1)
        return t if t.is_contiguous() else t.contiguous()

    def from_kernel(self, t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        if self.transpose:
            return t.movedim(-1, self.dim).contiguous()
        return t.view(shape)


def forward(x: torch.Tensor, dim: int, log: bool) -> torch.Tensor:
    if x.dtype not in KERNEL_DTYPES:
        return reference.forward(x, dim, log)
    if x.numel() == 0:
        return torch.empty_like(x, memory_format=torch.contiguous_format)
    layout = _Layout(x.shape, dim)
    xk = layout.to_kernel(x)
    yk = torch.empty_like(xk)
    _core.softmax_forward(xk, yk, layout.outer, layout.n, layout.inner, log)
    return layout.from_kernel(yk, x.shape)


def backward(y: torch.Tensor, grad: torch.Tensor, dim: int, log: bool) -> torch.Tensor:
    if y.dtype not in KERNEL_DTYPES:
        return reference.backward(y, grad, dim, log)
    if y.numel() == 0:
        return torch.empty_like(y, memory_format=torch.contiguous_format)
    layout = _Layout(y.shape, dim)
    yk = layout.to_kernel(y)
    gk = layout.to_kernel(grad)
    dxk = torch.empty_like(yk)
    _core.softmax_backward(yk, gk, dxk, layout.outer, layout.n, layout.inner, log)
    return layout.from_kernel(dxk, y.shape)
