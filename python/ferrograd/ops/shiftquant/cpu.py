"""The Rust ShiftQuant kernels on CPU tensors: the quantizers read float32 and bfloat16 as they
are (other floating dtypes are converted to float32 first), the GEMM writes float32 or bfloat16
(other dtypes: converted from float32)."""

from __future__ import annotations

import torch

from ... import _core

Quantized = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def quantize(
    x: torch.Tensor, bits: int, group_size: int, seed: int | None, transposed: bool
) -> Quantized:
    """codes, scale, shifts of a matrix [R, C] along C (or along R with ``transposed``: then of
    shape [C, R], the quantization of x.T). ``seed`` None rounds to nearest."""
    return _quantize(x, bits, group_size, seed, transposed, None)


def quantize_with_col_sums(
    x: torch.Tensor, bits: int, group_size: int, seed: int | None
) -> tuple[Quantized, torch.Tensor]:
    """``quantize(x, ..., transposed=True)`` and the float32 sums of x's columns, from one read
    of x (ShiftQuantLinear's dW operand and bias gradient)."""
    sums = torch.empty(x.shape[1], dtype=torch.float32)
    return _quantize(x, bits, group_size, seed, True, sums), sums


def _quantize(x, bits, group_size, seed, transposed, col_sums) -> Quantized:
    bf16 = x.dtype == torch.bfloat16
    x = (x if bf16 or x.dtype == torch.float32 else x.float()).contiguous()
    rows, length = x.shape[::-1] if transposed else x.shape
    codes = torch.empty((rows, length), dtype=torch.int8)
    scale = torch.empty(rows, dtype=torch.float32)
    shifts = torch.empty((rows, -(-length // group_size)), dtype=torch.uint8)
    _core.shiftquant_quantize(
        x, codes, scale, shifts, length, bits, group_size, seed, transposed, col_sums
    )
    return codes, scale, shifts


def dequantize(
    codes: torch.Tensor, scale: torch.Tensor, shifts: torch.Tensor, group_size: int
) -> torch.Tensor:
    out = torch.empty(codes.shape, dtype=torch.float32)
    _core.shiftquant_dequantize(
        codes.contiguous(), scale.contiguous(), shifts.contiguous(), group_size, out
    )
    return out


def matmul(
    a_codes: torch.Tensor,
    a_scale: torch.Tensor,
    a_shifts: torch.Tensor,
    b_codes: torch.Tensor,
    b_scale: torch.Tensor,
    b_shifts: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    m, k = a_codes.shape
    bf16 = dtype == torch.bfloat16
    out = torch.empty((m, b_codes.shape[0]), dtype=dtype if bf16 else torch.float32)
    operands = [t.contiguous() for t in (a_codes, a_scale, a_shifts, b_codes, b_scale, b_shifts)]
    bias = None if bias is None else bias.float().contiguous()
    _core.shiftquant_matmul(*operands, k, group_size, out, bias)
    return out if bf16 or dtype == torch.float32 else out.to(dtype)
