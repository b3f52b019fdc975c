"""L1 LayerNorm (DESIGN.md section 5):
y = (x - mean) / (sqrt(pi/2) * mean|x - mean| + eps) * weight + bias over the normalized dims.

float32 / bfloat16 / float16 run the float32 Rust kernels (returned in the input dtype), float64
runs the float64 ones (so gradcheck works). With ``bits`` set, the input is first ShiftQuant-
quantized (nearest, groups of 64) and the statistics are computed exactly in integers from the
codes; the backward treats that quantization as the identity (straight-through) and reads the
codes, so the layer saves int8 instead of float activations.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .. import _core
from ._checks import check_floating, check_tensor
from .shiftquant import ShiftQuantTensor, _check_cpu, check_spec, quantize_2d

__all__ = ["l1_layer_norm"]

#: Group size of the codes path.
CODES_GROUP_SIZE = 64


def _kernel_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _np(t: torch.Tensor | None):
    return None if t is None else t.numpy()


class _L1LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, n: int, eps: float, bits: int | None):
        kd = _kernel_dtype(x.dtype) if bits is None else torch.float32
        x2 = x.detach().reshape(-1, n).to(kd).contiguous()
        w = None if weight is None else weight.detach().to(kd).contiguous()
        b = None if bias is None else bias.detach().to(kd).contiguous()
        rows = x2.shape[0]
        y = torch.empty_like(x2)
        mean = torch.empty(rows, dtype=kd)
        rstd = torch.empty(rows, dtype=kd)
        if bits is None:
            forward = (
                _core.l1_norm_forward_f64 if kd == torch.float64 else _core.l1_norm_forward_f32
            )
            forward(x2.numpy(), n, eps, _np(w), _np(b), y.numpy(), mean.numpy(), rstd.numpy())
            saved = x2
            ctx.codes = None
        else:
            q = quantize_2d(x2, bits, CODES_GROUP_SIZE, None)
            arrays = (q.codes.numpy(), q.scale.numpy(), q.shifts.numpy())
            _core.l1_norm_forward_codes(
                *arrays,
                CODES_GROUP_SIZE,
                n,
                eps,
                _np(w),
                _np(b),
                y.numpy(),
                mean.numpy(),
                rstd.numpy(),
            )
            saved = q.codes
            ctx.codes = q
        ctx.save_for_backward(saved, mean, rstd, w)
        ctx.shape, ctx.dtype, ctx.n = x.shape, x.dtype, n
        ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
        return y.reshape(x.shape).to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        saved, mean, rstd, w = ctx.saved_tensors
        kd = mean.dtype
        n = ctx.n
        dy = grad_out.reshape(-1, n).to(kd).contiguous()
        dx = torch.empty_like(dy)
        dw = torch.empty(n, dtype=kd) if ctx.has_weight and ctx.needs_input_grad[1] else None
        db = torch.empty(n, dtype=kd) if ctx.has_bias and ctx.needs_input_grad[2] else None
        stats = (mean.numpy(), rstd.numpy(), dy.numpy(), _np(w), dx.numpy(), _np(dw), _np(db))
        q: ShiftQuantTensor | None = ctx.codes
        if q is None:
            backward = (
                _core.l1_norm_backward_f64 if kd == torch.float64 else _core.l1_norm_backward_f32
            )
            backward(saved.numpy(), n, *stats)
        else:
            arrays = (saved.numpy(), q.scale.numpy(), q.shifts.numpy())
            _core.l1_norm_backward_codes(*arrays, CODES_GROUP_SIZE, n, *stats)
        dx = dx.reshape(ctx.shape).to(ctx.dtype)
        return dx, dw, db, None, None, None


def l1_layer_norm(
    x: torch.Tensor,
    normalized_shape: tuple[int, ...],
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    bits: int | None = None,
) -> torch.Tensor:
    """L1 LayerNorm of ``x`` over its trailing ``normalized_shape`` dims (see module doc)."""
    op = "l1_layer_norm"
    check_tensor(op, "x", x)
    check_floating(op, "x", x)
    _check_cpu(op, "x", x)
    if bits is not None:
        check_spec(op, bits, CODES_GROUP_SIZE)
    shape = tuple(normalized_shape)
    if not shape or tuple(x.shape[-len(shape) :]) != shape:
        raise ValueError(
            f"{op}: x's trailing dims must be normalized_shape={shape}, got {tuple(x.shape)}"
        )
    n = 1
    for d in shape:
        n *= d
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and tuple(p.shape) != shape:
            raise ValueError(f"{op}: {name} must have shape {shape}, got {tuple(p.shape)}")
    w = None if weight is None else weight.reshape(n)
    b = None if bias is None else bias.reshape(n)
    if x.numel() == 0:
        return x.clone()
    return _L1LayerNorm.apply(x, w, b, n, float(eps), bits)
