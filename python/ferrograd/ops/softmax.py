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
        self.n = shape[dim]
        self.outer = math.prod(shape[:dim])
        inner = math.prod(shape[dim + 1 :])
        self.transpose = 1 < inner < _MIN_LANES
        if self.transpose:
            self.outer, inner = self.outer * inner, 1
        self.inner = inner

    def to_kernel(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach().to(torch.float32)
        if self.transpose:
            t = t.movedim(self.dim, -1)
        return t.contiguous()

    def from_kernel(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.transpose:
            t = t.movedim(-1, self.dim).contiguous()
        return t.to(dtype)

    def dims(self) -> tuple[int, int, int]:
        return self.outer, self.n, self.inner


def _flat(t: torch.Tensor):
    return t.view(-1).numpy()


class _SoftmaxFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, log: bool) -> torch.Tensor:
        shape = x.shape
        if x.dim() == 0:
            x = x.reshape(1)
        layout = _Layout(x.shape, dim)
        xk = layout.to_kernel(x)
        yk = torch.empty_like(xk)
        _core.softmax_forward(_flat(xk), _flat(yk), *layout.dims(), log)
        y = layout.from_kernel(yk, x.dtype).reshape(shape)
        ctx.save_for_backward(y)
        ctx.layout, ctx.log = layout, log
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        (y,) = ctx.saved_tensors
        layout, log = ctx.layout, ctx.log
        shape = y.shape
        if y.dim() == 0:
            y, grad_out = y.reshape(1), grad_out.reshape(1)
        yk = layout.to_kernel(y)
        gk = layout.to_kernel(grad_out)
        dxk = torch.empty_like(yk)
        _core.softmax_backward(_flat(yk), _flat(gk), _flat(dxk), *layout.dims(), log)
        return layout.from_kernel(dxk, y.dtype).reshape(shape), None, None


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
    return _SoftmaxFunction.apply(x, d, log)


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
    _core.softmax_three_pass(_flat(xc), _flat(y), xc.shape[-1], variant)
    return y
