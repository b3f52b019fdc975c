"""L1 LayerNorm (DESIGN.md section 5):
y = (x - mean) / (sqrt(pi/2) * mean|x - mean| + eps) * weight + bias over the normalized dims.

float32 / bfloat16 / float16 run the float32 Rust kernels (returned in the input dtype), float64
runs the float64 ones (so gradcheck works). With ``bits`` set, the input is first ShiftQuant-
quantized (nearest, groups of 64) and the statistics are computed exactly in integers from the
codes; the backward treats that quantization as the identity (straight-through) and reads the
codes, so the layer saves int8 instead of float activations.

CPU tensors run the Rust kernels; other devices run the same rule in torch ops (the codes path
quantizes with kernels/shiftquant.cu on CUDA and computes the same integer statistics).
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from .. import _core
from ._checks import check_floating, check_tensor
from .shiftquant import ShiftQuantTensor, check_device, check_spec, element_shifts, quantize_2d

__all__ = ["l1_layer_norm"]

#: Group size of the codes path.
CODES_GROUP_SIZE = 64
#: sqrt(pi / 2): makes mean|x - mean| match the standard deviation of a Gaussian.
SQRT_HALF_PI = math.sqrt(math.pi / 2)


def _kernel_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


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
            forward(x2, n, eps, w, b, y, mean, rstd)
            saved = x2
            ctx.codes = None
        else:
            q = quantize_2d(x2, bits, CODES_GROUP_SIZE, None)
            arrays = (q.codes, q.scale, q.shifts)
            _core.l1_norm_forward_codes(
                *arrays,
                CODES_GROUP_SIZE,
                n,
                eps,
                w,
                b,
                y,
                mean,
                rstd,
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
        stats = (mean, rstd, dy, w, dx, dw, db)
        q: ShiftQuantTensor | None = ctx.codes
        if q is None:
            backward = (
                _core.l1_norm_backward_f64 if kd == torch.float64 else _core.l1_norm_backward_f32
            )
            backward(saved, n, *stats)
        else:
            arrays = (saved, q.scale, q.shifts)
            _core.l1_norm_backward_codes(*arrays, CODES_GROUP_SIZE, n, *stats)
        dx = dx.reshape(ctx.shape).to(ctx.dtype)
        return dx, dw, db, None, None, None


def _integer_statistics(q: ShiftQuantTensor, n: int, eps: float):
    """mean, r and d * r of the codes path, from exact integers: with v = q * 2^(15 - k) (the
    row in units of scale * 2^-15), e = n v - Σv and E = Σ|e|, d = scale 2^-15 e / n and
    mean|d| = scale 2^-15 E / n² (as rust/l1norm.rs)."""
    v = q.codes.to(torch.int64) << (15 - element_shifts(q))
    total = v.sum(-1, keepdim=True)
    e = n * v - total
    unit = q.scale.double()[:, None] / 32768.0
    mean = unit * total / n
    r = 1.0 / (SQRT_HALF_PI * unit * e.abs().sum(-1, keepdim=True) / (n * n) + eps)
    return mean, r, (e.double() * (unit * r / n)).float()


class _L1LayerNormTorch(torch.autograd.Function):
    """The rule of the Rust kernels in torch ops, for tensors on other devices: statistics
    accumulated in float64, the backward of rust/l1norm.rs."""

    @staticmethod
    def forward(ctx, x, weight, bias, n: int, eps: float, bits: int | None):
        kd = _kernel_dtype(x.dtype) if bits is None else torch.float32
        x2 = x.detach().reshape(-1, n).to(kd)
        if bits is None:
            mean = x2.mean(-1, keepdim=True, dtype=torch.float64).to(kd)
            d = x2 - mean
            mean_abs = d.abs().mean(-1, keepdim=True, dtype=torch.float64)
            r = (1.0 / (SQRT_HALF_PI * mean_abs + eps)).to(kd)
            y = d * r
            saved = x2
        else:
            q = quantize_2d(x2, bits, CODES_GROUP_SIZE, None)
            mean, r, y = _integer_statistics(q, n, eps)
            mean, r = mean.float(), r.float()
            saved = q.dequantize()
        if weight is not None:
            y = y * weight.detach().to(kd)
        if bias is not None:
            y = y + bias.detach().to(kd)
        ctx.save_for_backward(saved, mean, r, weight)
        ctx.shape, ctx.dtype, ctx.n = x.shape, x.dtype, n
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.reshape(x.shape).to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x2, mean, r, weight = ctx.saved_tensors
        n = ctx.n
        dy = grad_out.reshape(-1, n).to(x2.dtype)
        d = x2 - mean
        g = dy if weight is None else dy * weight.to(x2.dtype)
        sign = torch.sign(d)
        mean_g = g.sum(-1, keepdim=True, dtype=torch.float64) / n
        mean_s = sign.sum(-1, keepdim=True, dtype=torch.float64) / n
        coef = (SQRT_HALF_PI / n * (g * d).sum(-1, keepdim=True, dtype=torch.float64)).to(r.dtype)
        coef = coef * r
        dx = r * ((g - mean_g.to(g.dtype)) - coef * (sign - mean_s.to(g.dtype)))
        dw = db = None
        if weight is not None and ctx.needs_input_grad[1]:
            dw = (dy * d * r).sum(0).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            db = dy.sum(0).to(ctx.bias_dtype)
        return dx.reshape(ctx.shape).to(ctx.dtype), dw, db, None, None, None


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
    if bits is not None:
        check_device(op, "x", x)
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
    for name, p in (("weight", w), ("bias", b)):
        if p is not None and p.device != x.device:
            raise ValueError(f"{op}: {name} is on {p.device}, x on {x.device}")
    norm = _L1LayerNorm if x.device.type == "cpu" else _L1LayerNormTorch
    return norm.apply(x, w, b, n, float(eps), bits)
