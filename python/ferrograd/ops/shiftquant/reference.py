"""ShiftQuant in plain torch ops: the tests' oracle and the kernels of every device ferrograd has
no kernel for. The quantizer gives the Rust kernels' codes, scales and shifts bit for bit, the
stochastic rounding's counter-based draws included (rust/shiftquant/quantize.rs); the GEMM is the
float64 product of the dequantized operands (exact up to the final rounding)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: The largest shift: all-zero groups, and groups 2^15 times smaller than their row, get it.
MAX_SHIFT = 15
_U32 = 0xFFFF_FFFF


def _u64(c: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    return c - (1 << 64) if c >= 1 << 63 else c


def _shr(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 tensors taken as unsigned 64-bit integers."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """rust/shiftquant/quantize.rs `mix32` on uint32 values held in int64 (products wrap)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB_352D) & _U32
    x = x ^ (x >> 15)
    x = (x * 0x846C_A68B) & _U32
    return x ^ (x >> 16)


def _row_keys(seed: int, rows: int, device: torch.device) -> torch.Tensor:
    """The key of each output row's random stream (`row_key`), int64 holding the u64 bits."""
    z = torch.arange(rows, dtype=torch.int64, device=device) * _u64(0x9E37_79B9_7F4A_7C15)
    z = z ^ _u64(seed)
    for _ in range(2):
        z = (z ^ _shr(z, 30)) * _u64(0xBF58_476D_1CE5_E9B9)
        z = (z ^ _shr(z, 27)) * _u64(0x94D0_49BB_1331_11EB)
        z = z ^ _shr(z, 31)
    return z


def _uniform(seed: int, rows: int, length: int, device: torch.device) -> torch.Tensor:
    """The draws in [0, 1) of the codes [rows, length]: 24 random bits of (seed, row, column)."""
    keys = _row_keys(seed, rows, device)[:, None]
    lo, hi = keys & _U32, _shr(keys, 32)
    col = torch.arange(length, dtype=torch.int64, device=device)
    bits = (_mix32(col ^ lo) ^ hi) >> 8
    return bits.float() * (1.0 / 16_777_216.0)


def _shifts(row_max: torch.Tensor, group_max: torch.Tensor) -> torch.Tensor:
    """floor(log2(row_max / group_max)) exactly, from exponents and mantissas, in 0..=15."""
    mr, er = torch.frexp(row_max[:, None])
    mg, eg = torch.frexp(group_max)
    k = (er - eg - (mg > mr).int()).clamp(0, MAX_SHIFT)
    return torch.where(group_max == 0, MAX_SHIFT, k)


def quantize(
    x: torch.Tensor,
    bits: int,
    group_size: int,
    seed: int | None,
    transposed: bool,
    slot: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """codes, scale, shifts of a matrix [R, C] along C (or along R with ``transposed``: then of
    shape [C, R], the quantization of x.T). ``seed`` None rounds to nearest; ``slot`` (cpu.py's
    workspace) is ignored."""
    x = x.float()
    if transposed:
        x = x.T
    rows, length = x.shape
    groups = -(-length // group_size)
    qmax = float(2 ** (bits - 1) - 1)
    dev = x.device
    if rows == 0 or length == 0:
        codes = torch.empty((rows, length), dtype=torch.int8, device=dev)
        shifts = torch.empty((rows, groups), dtype=torch.uint8, device=dev)
        return codes, torch.zeros(rows, device=dev), shifts
    padded = F.pad(x.abs(), (0, groups * group_size - length))
    group_max = padded.view(rows, groups, group_size).amax(-1)  # NaN propagates
    row_max = group_max.amax(-1)
    # A row holding NaN or infinity gets scale NaN, an all-zero row scale 0: codes 0, shifts 15.
    finite = torch.isfinite(row_max)
    special = ~finite | (row_max == 0)
    # A tensor divisor: a scalar one may become a multiplication by its reciprocal.
    scale = torch.where(finite, row_max / torch.full_like(row_max, qmax), float("nan"))
    k = torch.where(special[:, None], MAX_SHIFT, _shifts(row_max, group_max))
    pow2 = ((k + 127) << 23).int().view(torch.float32)
    pow2 = pow2.repeat_interleave(group_size, dim=-1)[:, :length]
    # x * 2^k / s rather than x / (s * 2^-k): no denormal loss, as the kernels compute it.
    t = torch.where(special[:, None], 0.0, (x * pow2) / scale[:, None])
    rounded = torch.round(t)  # half to even
    if seed is not None:
        floor = torch.where(rounded > t, rounded - 1.0, rounded)
        u = _uniform(seed, rows, length, dev)
        rounded = torch.where(u < t - floor, floor + 1.0, floor)
    codes = rounded.clamp(-qmax, qmax).to(torch.int8)
    return codes, scale, k.to(torch.uint8)


def quantize_with_col_sums(
    x: torch.Tensor, bits: int, group_size: int, seed: int | None, slot: int | None = None
) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """``quantize(x, ..., transposed=True)`` and the float32 sums of x's columns."""
    return quantize(x, bits, group_size, seed, True), x.sum(0, dtype=torch.float32)


def element_shifts(shifts: torch.Tensor, group_size: int, length: int) -> torch.Tensor:
    """The shift of every code (int32 [..., length]) from the per-group ``shifts``."""
    return shifts.to(torch.int32).repeat_interleave(group_size, dim=-1)[..., :length]


def dequantize(
    codes: torch.Tensor, scale: torch.Tensor, shifts: torch.Tensor, group_size: int
) -> torch.Tensor:
    """codes * (scale * 2^-shift) in float32, rounded as the Rust kernel rounds."""
    k = element_shifts(shifts, group_size, codes.shape[-1])
    pow2 = ((127 - k) << 23).view(torch.float32)  # 2^-k from its bits: exact on any device
    return codes.float() * (scale.float()[..., None] * pow2)


def _dequantize_exact(codes, scale, shifts, group_size) -> torch.Tensor:
    """The values the codes stand for in float64, where the products are exact."""
    k = element_shifts(shifts, group_size, codes.shape[-1]).double()
    return codes.double() * scale.double()[..., None] * torch.exp2(-k)


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
    """[M, N] = a @ b.T (+ bias) in ``dtype`` for 2-D operands quantized along K."""
    a = _dequantize_exact(a_codes, a_scale, a_shifts, group_size)
    b = _dequantize_exact(b_codes, b_scale, b_shifts, group_size)
    out = a @ b.T
    if bias is not None:
        out = out + bias.double()
    return out.float().to(dtype)
