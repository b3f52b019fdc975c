"""L1 LayerNorm in plain torch ops, the rule of rust/l1norm.rs: statistics accumulated in float64,
the same backward; the codes path's statistics exactly in integers. The tests' oracle and the
kernels of every device without a ferrograd kernel (CUDA included)."""

from __future__ import annotations

import math

import torch

from .._checks import compute_dtype
from ..shiftquant import element_shifts

#: sqrt(pi / 2): makes mean|x - mean| match the standard deviation of a Gaussian.
SQRT_HALF_PI = math.sqrt(math.pi / 2)


def rows(x: torch.Tensor):
    """The rows of x [..., n]: every leading dim (symbolic under torch.compile)."""
    return math.prod(x.shape[:-1])


def check_rows(op: str, x: torch.Tensor) -> None:
    """x [..., n] has at least one dim, or the ValueError naming ``op`` and x."""
    if x.dim() == 0:
        raise ValueError(f"{op}: x must have at least one dim")


def _affine(y, weight, bias, dtype):
    if weight is not None:
        y = y * weight.to(y.dtype)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(dtype)


def forward(x: torch.Tensor, weight, bias, eps: float):
    """y (x's dtype and shape) and per-row mean and 1 / (sqrt(pi/2) mean|x - mean| + eps) of
    x [..., n] (rows: every leading dim), the statistics in the kernel dtype."""
    kd = compute_dtype(x.dtype)
    xk = x.to(kd)
    mean = xk.mean(-1, keepdim=True, dtype=torch.float64).to(kd)
    d = xk - mean
    mean_abs = d.abs().mean(-1, keepdim=True, dtype=torch.float64)
    r = (1.0 / (SQRT_HALF_PI * mean_abs + eps)).to(kd)
    return _affine(d * r, weight, bias, x.dtype), mean.reshape(-1), r.reshape(-1)


def _integers(codes, scale, shifts, group_size: int):
    """The row as exact integers v = q * 2^(15 - k) (in units of scale * 2^-15), and that unit
    (float64 [rows, 1])."""
    k = element_shifts(shifts, group_size, codes.shape[-1])
    return codes.to(torch.int64) << (15 - k), scale.double()[:, None] / 32768.0


def forward_codes(x, codes, scale, shifts, group_size: int, weight, bias, eps: float):
    """The forward of the dequantized codes (float32 statistics), y in x's dtype: with
    e = n v - Σv and E = Σ|e|, d = unit e / n and mean|d| = unit E / n² (as rust/l1norm.rs)."""
    n = codes.shape[-1]
    v, unit = _integers(codes, scale, shifts, group_size)
    total = v.sum(-1, keepdim=True)
    e = n * v - total
    mean = unit * total / n
    r = 1.0 / (SQRT_HALF_PI * unit * e.abs().sum(-1, keepdim=True) / (n * n) + eps)
    y = (e.double() * (unit * r / n)).float()
    return _affine(y, weight, bias, x.dtype), mean[:, 0].float(), r[:, 0].float()


def _backward(dy, x, mean, r, weight, weight_grad: bool, bias_grad: bool):
    """Gradients at x (the kernel dtype) from the saved statistics ([rows])."""
    n = x.shape[-1]
    mean, r = mean[:, None], r[:, None]
    d = x - mean
    g = dy if weight is None else dy * weight.to(x.dtype)
    sign = torch.sign(d)
    mean_g = g.sum(-1, keepdim=True, dtype=torch.float64) / n
    mean_s = sign.sum(-1, keepdim=True, dtype=torch.float64) / n
    coef = (SQRT_HALF_PI / n * (g * d).sum(-1, keepdim=True, dtype=torch.float64)).to(r.dtype)
    coef = coef * r
    dx = r * ((g - mean_g.to(g.dtype)) - coef * (sign - mean_s.to(g.dtype)))
    dw = (dy * d * r).sum(0) if weight_grad else x.new_empty(0)
    db = dy.sum(0) if bias_grad else x.new_empty(0)
    return dx, dw, db


def backward(grad, x, mean, rstd, weight, weight_grad: bool, bias_grad: bool):
    """dx (grad's dtype and shape), dweight and dbias (the kernel dtype; empty when not asked
    for); grad and x [..., n]."""
    n = x.shape[-1]
    g2, x2 = grad.reshape(-1, n).to(mean.dtype), x.reshape(-1, n).to(mean.dtype)
    dx, dw, db = _backward(g2, x2, mean, rstd, weight, weight_grad, bias_grad)
    return dx.to(grad.dtype).reshape(grad.shape), dw, db


def backward_codes(
    grad, codes, scale, shifts, group_size: int, mean, rstd, weight, weight_grad, bias_grad
):
    """The float backward at the dequantized input (straight-through to x)."""
    v, unit = _integers(codes, scale, shifts, group_size)
    x = (v.double() * unit).float()
    dx, dw, db = _backward(grad.float(), x, mean, rstd, weight, weight_grad, bias_grad)
    return dx.to(grad.dtype), dw, db


def rms_forward(x: torch.Tensor, weight, eps: float):
    """L1 RMSNorm of x [..., n]: y (x's dtype and shape) and per-row r = 1 / (sqrt(pi/2) mean|x|
    + eps) (the kernel dtype), the statistic accumulated in float64."""
    kd = compute_dtype(x.dtype)
    xk = x.to(kd)
    mean_abs = xk.abs().mean(-1, keepdim=True, dtype=torch.float64)
    r = (1.0 / (SQRT_HALF_PI * mean_abs + eps)).to(kd)
    return _affine(xk * r, weight, None, x.dtype), r.reshape(-1)


def rms_backward(grad, x, rstd, weight, weight_grad: bool):
    """dx (grad's dtype) and dweight (the kernel dtype; empty when not asked for): with g = dy w,
    dx = r g - r² sqrt(pi/2) / n Σ(g x) sign(x)."""
    kd, shape = rstd.dtype, grad.shape
    grad, x = grad.reshape(-1, x.shape[-1]), x.reshape(-1, x.shape[-1])
    dy, xk, r = grad.to(kd), x.to(kd), rstd[:, None]
    g = dy if weight is None else dy * weight.to(kd)
    gx = (g * xk).sum(-1, keepdim=True, dtype=torch.float64).to(kd)
    dx = r * g - (SQRT_HALF_PI / x.shape[-1]) * r * r * gx * torch.sign(xk)
    dw = (dy * xk * r).sum(0) if weight_grad else xk.new_empty(0)
    return dx.to(grad.dtype).reshape(shape), dw
