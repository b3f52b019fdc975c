"""The Rust L1 norm kernels on CPU tensors x [..., n] (rows: every leading dim): float32,
bfloat16 and float16 rows read and written in their own dtype (computed in float32, statistics
saved as float32); float64 runs reference.py (gradcheck's dtype, no kernel of its own); the
codes path from ShiftQuant codes (groups along n), its statistics exact in integers."""

from __future__ import annotations

import torch

from ... import _core
from .._memory import fresh
from . import reference

#: The dtypes with kernels.
_KERNEL = (torch.float32, torch.bfloat16, torch.float16)
_F32 = torch.float32


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    if t is None or (t.dtype is _F32 and t.is_contiguous()):
        return t
    return t.to(_F32).contiguous()


def _rows(x: torch.Tensor) -> int:
    """The rows of x [..., n] (a division: the product of the leading dims costs four times as
    much per call)."""
    n = x.shape[-1]
    return x.numel() // n if n else reference.rows(x)


def _grads(n: int, weight_grad: bool, bias_grad: bool):
    """dweight and dbias buffers (None for the kernel) and what the op returns for them."""
    dw = torch.empty(n, dtype=_F32) if weight_grad else None
    db = torch.empty(n, dtype=_F32) if bias_grad else None

    def returned(t):  # outputs must not alias one another
        return torch.empty(0, dtype=_F32) if t is None else t

    return dw, db, returned(dw), returned(db)


def forward(x: torch.Tensor, weight, bias, eps: float):
    if x.dtype not in _KERNEL:
        return reference.forward(x, weight, bias, eps)
    reference.check_rows("l1_layer_norm", x)  # the ops themselves (also public)
    x = x.contiguous()
    n, rows = x.shape[-1], _rows(x)
    # Outputs made like their contiguous inputs: torch.empty of a torch.Size and a dtype costs
    # 2.5 us a call in torch's argument parser, empty_like 0.85.
    y = fresh(torch.empty_like(x))
    mean, rstd = torch.empty(rows, dtype=_F32), torch.empty(rows, dtype=_F32)
    _core.l1_norm_forward(x, n, eps, _f32(weight), _f32(bias), y, mean, rstd)
    return y, mean, rstd


def backward(grad, x, mean, rstd, weight, weight_grad: bool, bias_grad: bool):
    if x.dtype not in _KERNEL or grad.dtype != x.dtype:
        return reference.backward(grad, x, mean, rstd, weight, weight_grad, bias_grad)
    n, grad = x.shape[-1], grad.contiguous()
    dx = fresh(torch.empty_like(grad))
    dw, db, dw_out, db_out = _grads(n, weight_grad, bias_grad)
    _core.l1_norm_backward(x.contiguous(), n, mean, rstd, grad, _f32(weight), dx, dw, db)
    return dx, dw_out, db_out


def rms_forward(x: torch.Tensor, weight, eps: float):
    if x.dtype not in _KERNEL:
        return reference.rms_forward(x, weight, eps)
    reference.check_rows("l1_rms_norm", x)
    x = x.contiguous()
    n, rows = x.shape[-1], _rows(x)
    y = fresh(torch.empty_like(x))
    rstd = torch.empty(rows, dtype=_F32)
    _core.l1_rms_norm_forward(x, n, eps, _f32(weight), y, rstd)
    return y, rstd


def rms_backward(grad, x, rstd, weight, weight_grad: bool):
    if x.dtype not in _KERNEL or grad.dtype != x.dtype:
        return reference.rms_backward(grad, x, rstd, weight, weight_grad)
    n, grad = x.shape[-1], grad.contiguous()
    dx = fresh(torch.empty_like(grad))
    dw = torch.empty(n if weight_grad else 0, dtype=_F32)
    _core.l1_rms_norm_backward(
        x.contiguous(), n, rstd, grad, _f32(weight), dx, dw if weight_grad else None
    )
    return dx, dw


def forward_codes(x, codes, scale, shifts, group_size: int, weight, bias, eps: float):
    rows, n = codes.shape
    y = fresh(torch.empty((rows, n), dtype=_F32))
    mean, rstd = torch.empty(rows, dtype=_F32), torch.empty(rows, dtype=_F32)
    codes, scale, shifts = (t.contiguous() for t in (codes, scale, shifts))
    _core.l1_norm_forward_codes(
        codes, scale, shifts, group_size, n, eps, _f32(weight), _f32(bias), y, mean, rstd
    )
    return y.to(x.dtype), mean, rstd


def backward_codes(
    grad, codes, scale, shifts, group_size: int, mean, rstd, weight, weight_grad, bias_grad
):
    n = codes.shape[1]
    dx = fresh(torch.empty(grad.shape, dtype=_F32))
    dw, db, dw_out, db_out = _grads(n, weight_grad, bias_grad)
    dy, w = _f32(grad), _f32(weight)
    codes, scale, shifts = (t.contiguous() for t in (codes, scale, shifts))
    _core.l1_norm_backward_codes(codes, scale, shifts, group_size, n, mean, rstd, dy, w, dx, dw, db)
    return dx.to(grad.dtype), dw_out, db_out
