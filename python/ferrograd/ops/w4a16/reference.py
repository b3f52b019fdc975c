"""W4 quantization and the W4A16 matmul in plain torch ops: the tests' oracle and the kernels of
every device, layout and dtype the Rust and CUDA kernels do not take."""

from __future__ import annotations

import torch

from .weight import CPU_BLOCKS, SYMMETRIC_ZERO, group_len, kernel_zeros, pack, unpack


def scale_dtype(dtype: torch.dtype) -> torch.dtype:
    """The stored scales' dtype of a weight of ``dtype``."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float16


def _groups(w: torch.Tensor, g: int, fill: float) -> torch.Tensor:
    """w [N, K] as [N, G, g], the last group padded with ``fill``."""
    n, k = w.shape
    padded = w.new_full((n, -(-k // g) * g), fill)
    padded[:, :k] = w
    return padded.view(n, -1, g)


def quantize(
    weight: torch.Tensor, group_size: int, zero_point: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed codes in the CPU layout, scales, stored zeros) of ``weight`` [N, K], computed in
    float32 as the Rust kernel computes them (round half to even)."""
    w = weight.float()
    k = w.shape[1]
    g = group_len(k, group_size)
    if zero_point:
        lo = _groups(w, g, float("inf")).amin(-1)
        hi = _groups(w, g, float("-inf")).amax(-1)
        scale = (hi - lo) / 15
    else:
        scale = _groups(w.abs(), g, 0.0).amax(-1) / 7
    scale = torch.where((scale == 0) | ~scale.isfinite(), 1.0, scale)
    per_column = scale.repeat_interleave(g, dim=1)[:, :k]
    q = torch.round(w / per_column)
    if zero_point:
        zero = torch.round(-lo / scale).clamp(0, 15)
        q = (q + zero.repeat_interleave(g, dim=1)[:, :k]).clamp(0, 15)
    else:
        zero = torch.full_like(scale, SYMMETRIC_ZERO)
        q = q.clamp(-8, 7) + SYMMETRIC_ZERO
    packed = pack(q.to(torch.uint8), CPU_BLOCKS)
    return packed, scale.to(scale_dtype(weight.dtype)), zero.to(torch.uint8)


def dequantize(
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    k: int,
    group_size: int,
    layout: str,
) -> torch.Tensor:
    """W_hat [N, K] float32 = (q - zero) * scale."""
    q = unpack(packed, layout, k).float()
    per_column = torch.arange(k, device=packed.device) // group_len(k, group_size)
    zeros = kernel_zeros(scales, zeros).float()
    return (q - zeros[:, per_column]) * scales.float()[:, per_column]


def matmul(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    layout: str,
) -> torch.Tensor:
    """x [..., K] @ W_hat.T -> [..., N] in x's dtype (W_hat rounded to x's dtype)."""
    w_hat = dequantize(packed, scales, zeros, x.shape[-1], group_size, layout)
    return x @ w_hat.to(x.dtype).T


def matmul_backward(
    grad: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    k: int,
    group_size: int,
    layout: str,
) -> torch.Tensor:
    """grad [..., N] @ W_hat -> [..., K], the gradient of x."""
    return grad @ dequantize(packed, scales, zeros, k, group_size, layout).to(grad.dtype)
