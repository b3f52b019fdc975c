"""Softmax and log-softmax (two-pass algorithm of Dukhan & Ablavatski) as ferrograd ops.

``ferrograd::softmax(x, dim, log)`` and ``ferrograd::softmax_backward(y, grad, dim, log)`` run
the Rust kernels on CPU tensors (cpu.py) and torch's own softmax everywhere else
(reference.py). Special values follow ``torch.softmax``: -inf entries are well defined, an all
-inf row gives NaN.
"""

from __future__ import annotations

import torch

from .. import _library
from .._checks import check_floating, check_tensor, normalize_dim
from . import cpu, reference

__all__ = ["log_softmax", "softmax"]


def _fake(x: torch.Tensor, dim: int, log: bool) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _fake_backward(y: torch.Tensor, grad: torch.Tensor, dim: int, log: bool) -> torch.Tensor:
    return torch.empty_like(y, memory_format=torch.contiguous_format)


softmax_op = _library.define(
    "softmax(Tensor x, int dim, bool log) -> Tensor",
    cpu=cpu.forward,
    reference=reference.forward,
    fake=_fake,
)
softmax_backward_op = _library.define(
    "softmax_backward(Tensor y, Tensor grad, int dim, bool log) -> Tensor",
    cpu=cpu.backward,
    reference=reference.backward,
    fake=_fake_backward,
)


def _setup_context(ctx, inputs, output) -> None:
    _, ctx.dim, ctx.log = inputs
    ctx.save_for_backward(output)


def _backward(ctx, grad: torch.Tensor):
    (y,) = ctx.saved_tensors
    return _library.call(softmax_backward_op, y, grad, ctx.dim, ctx.log), None, None


def _differentiable_backward(ctx, grad: torch.Tensor):
    """The backward in torch's ops, whose own derivatives torch has (create_graph=True)."""
    (y,) = ctx.saved_tensors
    return reference.backward(y, grad, ctx.dim, ctx.log), None, None


_library.register_autograd(
    softmax_op, _backward, _setup_context, differentiable_backward=_differentiable_backward
)


def _vmap(info, in_dims, x: torch.Tensor, dim: int, log: bool):
    """torch.func.vmap's rule: the batch dim moved first, one call over the whole batch (dim
    counts the unbatched dims; a negative one counts from the end either way)."""
    if in_dims[0] is None:
        return softmax_op(x, dim, log), None
    x = x.movedim(in_dims[0], 0)
    return softmax_op(x, dim + 1 if dim >= 0 else dim, log), 0


torch.library.register_vmap(softmax_op, _vmap, lib=_library.LIB)


def _checked(op: str, x: object, dim: object, dtype: object) -> tuple[torch.Tensor, int]:
    """x (cast to ``dtype``) and dim in [0, rank), or the error naming the argument."""
    check_tensor(op, "x", x)
    if dtype is not None:
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"{op}: dtype must be a torch.dtype or None, got {dtype!r}")
        x = x.to(dtype)
    check_floating(op, "x", x)  # complex dtypes are not floating point
    return x, normalize_dim(op, dim, x.dim())


def _apply(op: str, x: torch.Tensor, dim: int, dtype: torch.dtype | None, log: bool):
    # The common call (a plain tensor, an int dim in range) checked inline: on inputs of a few
    # thousand elements each Python call here costs a few percent of the op.
    rank = (x.dim() or 1) if type(x) is torch.Tensor else 0
    if dtype is None and type(dim) is int and -rank <= dim < rank and x.is_floating_point():
        dim %= rank
    else:
        x, dim = _checked(op, x, dim, dtype)
    if x.is_cpu and cpu.torch_is_faster(x, dim, log):  # torch's own op, eager or traced
        return torch.log_softmax(x, dim) if log else torch.softmax(x, dim)
    return _library.call(softmax_op, x, dim, log)


def softmax(x: torch.Tensor, dim: int = -1, dtype: torch.dtype | None = None) -> torch.Tensor:
    """softmax(x) along ``dim``, differentiable, a drop-in for ``torch.softmax``: ``dtype``
    casts x first. float32 / bfloat16 / float16 CPU tensors run the Rust kernels (read and
    written in x's dtype, computed in float32), except inputs small enough that torch's own
    softmax is faster; other dtypes and devices run torch's softmax."""
    return _apply("softmax", x, dim, dtype, log=False)


def log_softmax(x: torch.Tensor, dim: int = -1, dtype: torch.dtype | None = None) -> torch.Tensor:
    """log_softmax(x) along ``dim``, differentiable; as :func:`softmax` otherwise."""
    return _apply("log_softmax", x, dim, dtype, log=True)
