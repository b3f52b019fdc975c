"""W4A16 matmul: y = x @ W_hat.T (+ bias) for a 4-bit weight (``fg.quant.quantize_w4``).

CPU: up to ``GEMV_MAX_ROWS`` rows of x run the Rust kernel that unpacks each block of codes in
registers once for 4 rows of x at a time (the weight is read in 4 bits: the point at small batch).
With AVX-512 VNNI or AVX2 it multiplies the codes by x rounded to 16-bit integers per row
(scale max|x| / 32639, split into two signed bytes for ``vpdpbusd`` / ``vpmaddubsw``): relative
error at most 2^-15 of the row's largest |x| per element, the "A16" of W4A16; rows holding NaN
or infinity, AVX-512 without VNNI and the scalar path run in float32. More rows
(or group sizes that are not multiples of 32) dequantize ``DEQUANT_BLOCK_ROWS`` rows of W at a
time into torch's float32 matmul.
Computed in float32, returned in x's dtype. The weight is frozen: autograd reaches x and bias.
CUDA: fp16 / bf16 x run kernels/w4a16.cu (mma.sync tensor cores, in-register dequantization,
split-K) when K and the group size are multiples of 32; other dtypes and shapes, and other
devices, dequantize with torch ops and call torch's matmul. The backward always does the latter.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .. import _core, cuda
from ..quant.w4 import W4Weight
from . import w4a16_cuda
from ._checks import check_floating, check_tensor

__all__ = ["w4a16_matmul"]

OP = "w4a16_matmul"
#: The most rows of x that take the GEMV kernel (which reads W once per 4 rows).
GEMV_MAX_ROWS = 16
#: Rows of W dequantized at a time for larger batches.
DEQUANT_BLOCK_ROWS = 1024


def _weight_blocks(w: W4Weight):
    """(n0, n1, W_hat[n0:n1] float32) over the rows of a CPU weight."""
    n, k = w.shape
    scales, zeros = w.kernel_params()
    block = torch.empty(min(n, DEQUANT_BLOCK_ROWS), k)
    for n0 in range(0, n, DEQUANT_BLOCK_ROWS):
        n1 = min(n, n0 + DEQUANT_BLOCK_ROWS)
        out = block[: n1 - n0]
        _core.w4_dequantize(
            w.packed, scales, zeros, n, k, w.group_size, n0, n1,
            out,
        )  # fmt: skip
        yield n0, n1, out


def _matmul_cpu(x: torch.Tensor, w: W4Weight) -> torch.Tensor:
    """x [M, K] float32 contiguous -> [M, N] float32."""
    m = x.shape[0]
    n, k = w.shape
    y = torch.empty(m, n)
    group = w.group_len
    if m <= GEMV_MAX_ROWS and group % 32 == 0:
        scales, zeros = w.kernel_params()
        _core.w4_gemv(
            w.packed, scales, zeros, n, k, w.group_size, x,
            y,
        )  # fmt: skip
        return y
    for n0, n1, block in _weight_blocks(w):
        y[:, n0:n1] = x @ block.T
    return y


def _grad_input_cpu(dy: torch.Tensor, w: W4Weight) -> torch.Tensor:
    """dy [M, N] float32 -> dy @ W_hat [M, K]."""
    dx = torch.zeros(dy.shape[0], w.shape[1])
    for n0, n1, block in _weight_blocks(w):
        dx.addmm_(dy[:, n0:n1], block)
    return dx


def _use_cuda_kernel(x: torch.Tensor, w: W4Weight) -> bool:
    """fp16 / bf16 x on a GPU with a shape kernels/w4a16.cu takes (else: dequantize + matmul)."""
    return (
        x.is_cuda
        and x.dtype in (torch.float16, torch.bfloat16)
        and w4a16_cuda.supports(w.shape[1], w.group_size)
        and cuda.is_available()
    )


class _W4A16Matmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2: torch.Tensor, w: W4Weight) -> torch.Tensor:
        ctx.w = w
        if x2.device.type == "cpu":
            return _matmul_cpu(x2.float().contiguous(), w).to(x2.dtype)
        if _use_cuda_kernel(x2, w):
            return w4a16_cuda.matmul(x2, w)
        return x2 @ w.dequantize().to(x2.dtype).T

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: torch.Tensor):
        w = ctx.w
        if dy.device.type == "cpu":
            return _grad_input_cpu(dy.float(), w).to(dy.dtype), None
        return dy @ w.dequantize().to(dy.dtype), None


def w4a16_matmul(x: torch.Tensor, w: W4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] (float16, bfloat16 or float32) @ W_hat.T (+ bias) -> [..., N] in x's dtype."""
    check_tensor(OP, "x", x)
    check_floating(OP, "x", x)
    if not isinstance(w, W4Weight):
        raise TypeError(
            f"{OP}: w must be a W4Weight (fg.quant.quantize_w4), got {type(w).__name__}"
        )
    n, k = w.shape
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"{OP}: x must have shape [..., K] with K = {k}, got {tuple(x.shape)}")
    if x.device != w.device:
        raise ValueError(f"{OP}: x is on {x.device} but w is on {w.device}")
    if bias is not None:
        check_tensor(OP, "bias", bias)
        if bias.shape != (n,) or bias.device != x.device:
            raise ValueError(f"{OP}: bias must have shape [N] = [{n}] on {x.device}, got "
                             f"{tuple(bias.shape)} on {bias.device}")  # fmt: skip
    y = _W4A16Matmul.apply(x.reshape(-1, k), w).view(*x.shape[:-1], n)
    return y if bias is None else y + bias.to(y.dtype)
