"""The Rust L1 LayerNorm kernels on CPU tensors x [rows, n]: float64 in float64, every other
floating dtype in float32 (returned in the input's dtype); the codes path from ShiftQuant codes
(groups along n), its statistics exact in integers."""

from __future__ import annotations

import torch

from ... import _core
from .reference import kernel_dtype

_FLOAT = {
    torch.float32: (_core.l1_norm_forward_f32, _core.l1_norm_backward_f32),
    torch.float64: (_core.l1_norm_forward_f64, _core.l1_norm_backward_f64),
}


def _kernel_input(t: torch.Tensor | None, kd: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(kd).contiguous()


def _outputs(rows: int, n: int, kd: torch.dtype):
    return (
        torch.empty((rows, n), dtype=kd),
        torch.empty(rows, dtype=kd),
        torch.empty(rows, dtype=kd),
    )


def _grads(n: int, kd: torch.dtype, weight_grad: bool, bias_grad: bool):
    """dweight and dbias buffers (None for the kernel) and what the op returns for them."""
    dw = torch.empty(n, dtype=kd) if weight_grad else None
    db = torch.empty(n, dtype=kd) if bias_grad else None

    def returned(t):  # outputs must not alias one another
        return torch.empty(0, dtype=kd) if t is None else t

    return dw, db, returned(dw), returned(db)


def forward(x: torch.Tensor, weight, bias, eps: float):
    kd = kernel_dtype(x.dtype)
    rows, n = x.shape
    y, mean, rstd = _outputs(rows, n, kd)
    w, b = _kernel_input(weight, kd), _kernel_input(bias, kd)
    _FLOAT[kd][0](_kernel_input(x, kd), n, eps, w, b, y, mean, rstd)
    return y.to(x.dtype), mean, rstd


def backward(grad, x, mean, rstd, weight, weight_grad: bool, bias_grad: bool):
    kd = mean.dtype
    n = x.shape[1]
    dx = torch.empty(grad.shape, dtype=kd)
    dw, db, dw_out, db_out = _grads(n, kd, weight_grad, bias_grad)
    dy, x, w = _kernel_input(grad, kd), _kernel_input(x, kd), _kernel_input(weight, kd)
    _FLOAT[kd][1](x, n, mean, rstd, dy, w, dx, dw, db)
    return dx.to(grad.dtype), dw_out, db_out


def forward_codes(x, codes, scale, shifts, group_size: int, weight, bias, eps: float):
    rows, n = codes.shape
    y, mean, rstd = _outputs(rows, n, torch.float32)
    w, b = _kernel_input(weight, torch.float32), _kernel_input(bias, torch.float32)
    codes, scale, shifts = (t.contiguous() for t in (codes, scale, shifts))
    _core.l1_norm_forward_codes(codes, scale, shifts, group_size, n, eps, w, b, y, mean, rstd)
    return y.to(x.dtype), mean, rstd


def backward_codes(
    grad, codes, scale, shifts, group_size: int, mean, rstd, weight, weight_grad, bias_grad
):
    n = codes.shape[1]
    dx = torch.empty(grad.shape, dtype=torch.float32)
    dw, db, dw_out, db_out = _grads(n, torch.float32, weight_grad, bias_grad)
    dy, w = _kernel_input(grad, torch.float32), _kernel_input(weight, torch.float32)
    codes, scale, shifts = (t.contiguous() for t in (codes, scale, shifts))
    _core.l1_norm_backward_codes(codes, scale, shifts, group_size, n, mean, rstd, dy, w, dx, dw, db)
    return dx.to(grad.dtype), dw_out, db_out
