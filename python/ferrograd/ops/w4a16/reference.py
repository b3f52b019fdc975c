"""W4 quantization and the W4A16 matmul in plain torch ops: the tests' oracle and the kernels of
every device, layout and dtype the Rust and CUDA kernels do not take."""

from __future__ import annotations

import torch

from .weight import CPU_BLOCKS, SYMMETRIC_ZERO, check_x, group_len, kernel_zeros, pack, unpack


def _groups(w: torch.Tensor, g: int, fill: float) -> torch.Tensor:
    """w [N, K] as [N, G, g], the last group padded with ``fill``."""
    n, k = w.shape
    padded = w.new_full((n, -(-k // g) * g), fill)
    padded[:, :k] = w
    return padded.view(n, -1, g)


#: The smallest positive float32 (a subnormal).
_SMALLEST_F32 = 2.0**-149


def _quotient(x: torch.Tensor, d: int) -> torch.Tensor:
    """x / d rounded once, as the Rust quantizer divides, on every device: CUDA divides by a
    Python number as x times its float32 reciprocal, up to one ulp off."""
    return x / torch.full_like(x, d)


def quantize(
    weight: torch.Tensor, group_size: int, zero_point: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed codes in the CPU layout, float32 scales, stored zeros) of ``weight`` [N, K],
    computed in float32 as the Rust kernel computes them (round half to even)."""
    w = weight.float()
    k = w.shape[1]
    g = group_len(k, group_size)
    if zero_point:
        # The range widened to hold 0 (padding with 0 leaves it unchanged).
        lo = _groups(w, g, 0.0).amin(-1).clamp(max=0)
        span = _groups(w, g, 0.0).amax(-1).clamp(min=0) - lo
        scale = _quotient(span, 15)
        check_range(scale)
    else:
        span = _groups(w.abs(), g, 0.0).amax(-1)
        scale = _quotient(span, 7)
    # 1 for an all-zero group; a range whose quotient underflows keeps the smallest positive
    # float32 (its codes still hold the weights, to half that step), as the Rust kernel does.
    scale = torch.where(span == 0, 1.0, scale.clamp(min=_SMALLEST_F32))
    per_column = scale.repeat_interleave(g, dim=1)[:, :k]
    q = torch.round(w / per_column)
    if zero_point:
        zero = torch.round(-lo / scale).clamp(0, 15)
        q = (q + zero.repeat_interleave(g, dim=1)[:, :k]).clamp(0, 15)
    else:
        zero = torch.full_like(scale, SYMMETRIC_ZERO)
        q = q.clamp(-8, 7) + SYMMETRIC_ZERO
    return pack(q.to(torch.uint8), CPU_BLOCKS), scale, zero.to(torch.uint8)


def check_range(scale: torch.Tensor) -> None:
    """Refuses groups whose range overflows float32 (the Rust quantizer's error)."""
    bad = torch.isinf(scale).any(-1).nonzero()
    if bad.numel():
        raise ValueError(
            f"quantize_w4: weight row {int(bad[0])} has a range (max - min, with 0) that "
            "overflows float32; use a smaller group_size or zero_point=False"
        )


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
    k: int,
    group_size: int,
    layout: str,
) -> torch.Tensor:
    """x [..., K] @ W_hat.T -> [..., N] in x's dtype (W_hat rounded to x's dtype)."""
    check_x(x, k)
    w_hat = dequantize(packed, scales, zeros, k, group_size, layout)
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
