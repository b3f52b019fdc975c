"""The Rust kernels on CPU tensors: float32 / bfloat16 / float16 read and written in their own
dtype (computed in float32 in registers); float64 runs the reference."""

from __future__ import annotations

import math

import torch

from ... import _core
from .._checks import KERNEL_DTYPES, normalize_dim
from .._memory import fresh
from . import reference

#: Inputs smaller than this times torch's thread count (up to 2, the counts measured) run
#: torch's op where it is as accurate (docs/softmax.md).
TORCH_BELOW = 32768
#: The same limit for inputs that record a graph: the backward's Python autograd node costs
#: more than torch's native one, and torch's forward + backward stayed ahead up to here.
TORCH_BELOW_GRAD = 131072

# With fewer independent softmaxes side by side than one AVX-512 vector holds, moving the
# softmax dim last (one copy) beats running the strided kernel on partial vectors.
_MIN_LANES = 16

_F32 = torch.float32


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
        """A contiguous tensor in the kernels' layout (no copy if already)."""
        if self.transpose:
            t = t.movedim(self.dim, -1)
        return t if t.is_contiguous() else t.contiguous()

    def from_kernel(self, t: torch.Tensor) -> torch.Tensor:
        return t.movedim(-1, self.dim).contiguous() if self.transpose else t


def torch_is_faster(x: torch.Tensor, dim: int, log: bool) -> bool:
    """Whether torch's own op beats the Rust kernel plus its call on this input and meets the
    kernels' accuracy: on small inputs the call costs more than the softmax (docs/softmax.md),
    but only torch's float32 log_softmax and its 16-bit softmax (float32 inside, rounded once)
    over the last dim are as accurate; its float32 softmax rounds x - max before exp() (2e-6
    relative error), its 16-bit log_softmax rounds in 16 bits, and over any other dim it sums
    each softmax in one running float32 sum (log_softmax over a column of 65535 1e-3 * randn
    values: 1.2e-4 off). Empty and one-element inputs (exact either way) always go to torch."""
    numel = x.numel()
    if numel <= 1:
        return True
    if log != (x.dtype is _F32) or dim != x.dim() - 1:
        return False
    grad = x.requires_grad and torch.is_grad_enabled()
    return _small(numel, TORCH_BELOW_GRAD if grad else TORCH_BELOW)


def _small(numel: int, below: int = TORCH_BELOW) -> bool:
    if numel < below or numel >= 2 * below:  # the same at 1 and 2 threads
        return numel < below
    # The thread count is not traceable: a compiled graph takes the 1-thread limit.
    threads = 1 if torch.compiler.is_compiling() else min(torch.get_num_threads(), 2)
    return numel < below * threads


def _kernel_args(t: torch.Tensor, dim: int) -> tuple[torch.Tensor, _Layout | None, int, int]:
    """The contiguous kernel input, the layout when it is not plain rows, and rows, n. The ops
    take any dim torch's softmax takes (the public functions hand them one in [0, rank))."""
    rank = t.dim()
    if not 0 <= dim < rank:
        dim = normalize_dim("softmax", dim, rank)
    if dim == rank - 1 and t.is_contiguous():
        n = t.shape[dim]
        return t, None, t.numel() // n, n
    layout = _Layout(t.shape, dim)
    return layout.to_kernel(t), layout, layout.outer, layout.n


def forward(x: torch.Tensor, dim: int, log: bool) -> torch.Tensor:
    """The kernel for every input of its dtypes: the public functions send the inputs where
    torch is faster (``torch_is_faster``) to torch before the op."""
    if x.dtype not in KERNEL_DTYPES or x.dim() == 0:
        return reference.forward(x, dim, log)
    xk, layout, outer, n = _kernel_args(x, dim)
    yk = fresh(torch.empty_like(xk))
    if layout is None:
        _core.softmax_forward(xk, yk, outer, n, 1, log)
        return yk
    _core.softmax_forward(xk, yk, outer, n, layout.inner, log)
    return layout.from_kernel(yk)


def backward(y: torch.Tensor, grad: torch.Tensor, dim: int, log: bool) -> torch.Tensor:
    if y.dtype not in KERNEL_DTYPES or _small(y.numel()):
        return reference.backward(y, grad, dim, log)
    yk, layout, outer, n = _kernel_args(y, dim)
    gk = grad if layout is None and grad.is_contiguous() else _kernel_args(grad, dim)[0]
    dxk = fresh(torch.empty_like(yk))
    _core.softmax_backward(yk, gk, dxk, outer, n, 1 if layout is None else layout.inner, log)
    return dxk if layout is None else layout.from_kernel(dxk)
