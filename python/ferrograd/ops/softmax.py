"""Softmax and log-softmax: the Rust two-pass kernels on CPU, torch elsewhere.

On CPU, float32 / bfloat16 / float16 inputs run the two-pass algorithm (computed in float32,
returned in the input dtype); float64 and non-CPU tensors use torch's own softmax.
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from .. import _core
from ._checks import KERNEL_DTYPES, check_floating, check_tensor, normalize_dim

__all__ = ["log_softmax", "softmax", "three_pass_softmax"]

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
        """A detached, contiguous float32 tensor in the kernels' layout (no copy if already)."""
        t = t.detach()
        if t.dtype != torch.float32:
            t = t.float()
        if self.transpose:
            t = t.movedim(self.dim, -1)
        return t if t.is_contiguous() else t.contiguous()

    def from_kernel(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.transpose:
            t = t.movedim(-1, self.dim).contiguous()
        return t if dtype == torch.float32 else t.to(dtype)


def _forward(x: torch.Tensor, dim: int, log: bool) -> tuple[torch.Tensor, _Layout]:
    layout = _Layout(x.shape, dim)
    xk = layout.to_kernel(x)
    yk = torch.empty_like(xk)
    _core.softmax_forward(xk.numpy(), yk.numpy(), layout.outer, layout.n, layout.inner, log)
    return layout.from_kernel(yk, x.dtype), layout


class _SoftmaxFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, log: bool) -> torch.Tensor:
        y, layout = _forward(x, dim, log)
        ctx.save_for_backward(y)
        ctx.layout, ctx.log = layout, log
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        (y,) = ctx.saved_tensors
        layout = ctx.layout
        yk = layout.to_kernel(y)
        gk = layout.to_kernel(grad_out)
        dxk = torch.empty_like(yk)
        dims = (layout.outer, layout.n, layout.inner)
        _core.softmax_backward(yk.numpy(), gk.numpy(), dxk.numpy(), *dims, ctx.log)
        return layout.from_kernel(dxk, y.dtype), None, None


def _apply(op: str, x: torch.Tensor, dim: int, log: bool) -> torch.Tensor:
    check_tensor(op, "x", x)
    check_floating(op, "x", x)
    if x.is_complex():
        raise TypeError(f"{op}: x must be a real floating-point tensor, got {x.dtype}")
    d = normalize_dim(op, dim, x.dim())
    if x.device.type != "cpu" or x.dtype not in KERNEL_DTYPES:
        return torch.log_softmax(x, dim) if log else torch.softmax(x, dim)
    if x.numel() == 0:
        return torch.empty_like(x, requires_grad=x.requires_grad)
    if x.requires_grad and torch.is_grad_enabled():
        return _SoftmaxFunction.apply(x, d, log)
    return _forward(x, d, log)[0]


def softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """softmax(x) along ``dim``, differentiable; special values follow ``torch.softmax``."""
    return _apply("softmax", x, dim, log=False)


def log_softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """log_softmax(x) along ``dim``, differentiable; special values follow torch."""
    return _apply("log_softmax", x, dim, log=True)


def three_pass_softmax(x: torch.Tensor, variant: str = "reload") -> torch.Tensor:
    """The classic max / sum / normalize softmax over the last dim of a float32 CPU tensor.

    A baseline for the benchmarks (no autograd): ``"reload"`` stores exp(x - max) and rescales it,
    ``"recompute"`` recomputes it in the last pass.
    """
    op = "three_pass_softmax"
    check_tensor(op, "x", x)
    if x.dtype != torch.float32 or x.device.type != "cpu":
        raise TypeError(f"{op}: x must be a float32 CPU tensor, got {x.dtype} on {x.device}")
    if x.dim() == 0 or x.numel() == 0:
        raise ValueError(f"{op}: x must have at least one dimension and one element")
    xc = x.detach().contiguous()
    y = torch.empty_like(xc)
    _core.softmax_three_pass(xc.numpy(), y.numpy(), xc.shape[-1], variant)
    return y
