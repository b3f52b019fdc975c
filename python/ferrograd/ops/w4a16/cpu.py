"""The Rust kernels on CPU tensors in the ``cpu_blocks`` layout (weight.py); other layouts and
float64 x run the reference. bf16 x reaches the kernels as it is (no float32 copy).

From ``GEMM_MIN_ROWS`` rows of x, on AVX-512 CPUs, a blocked GEMM dequantizes tiles of W to exact
codes (q - zero) and multiplies them with x, each group's float32 sums meeting its scale once: on
AMD (with AVX-512 BF16) in bf16 by ``vdpbf16ps`` (bf16 x exactly, float32 and float16 x as two bf16
terms, within 2^-17 of x per element), on Intel, whose ``vdpbf16ps`` (where it has one) runs at
half the rate of its float32 multiply-adds, by those (bf16 x exactly, float32 x as it is). Fewer
rows (up to ``GEMV_MAX_ROWS`` elsewhere) run the GEMV that unpacks each block of codes in registers
once per 4 rows of x (up to ``INT_GEMV_MAX_ROWS`` with the integer kernels).
With AVX-512 VNNI or AVX2 (also on AVX-512 CPUs without VNNI) it multiplies the codes by x rounded
to 16-bit integers per row (scale max|x| / 32639, split into two signed bytes for ``vpdpbusd`` /
``vpmaddubsw``): relative error at most 2^-15 of the row's largest |x| per element, the "A16" of
W4A16; rows holding NaN or infinity and the scalar path run in float32. Other cases (more rows than
the GEMV takes without AVX-512, group sizes that are not multiples of 32) dequantize
``DEQUANT_BLOCK_ROWS`` rows of W at a time into torch's float32 matmul, as the gradient of x does.
Returned in x's dtype.
"""

from __future__ import annotations

import functools

import torch

from ... import _core
from .._checks import KERNEL_DTYPES, as_dtype
from .._matmul import bf16_matmul_is_faster
from .._memory import fresh
from . import reference
from .weight import CPU_BLOCKS, check_x, group_len, kernel_zeros, packed_shape

#: The most rows of x that take the GEMV kernel (which reads W once per 8 or 4 rows).
GEMV_MAX_ROWS = 16
#: The same with the integer GEMV kernels (AVX2, AVX-512 VNNI) where no AVX-512 GEMM takes over:
#: each part of 64 rows of W stays in cache while every pass of 4 rows of x meets it, which beat
#: dequantizing W into torch's float32 matmul up to 64 rows (Zen 3, bf16 x, 2 threads, 4096 x 4096
#: and 11008 x 4096: 1.8-2.2x at 24-32 rows, 1.4x at 64, even at 128; 1.14x at 64 on 1 thread).
INT_GEMV_MAX_ROWS = 64
#: Rows of x from which the AVX-512 GEMM takes over from the GEMV (where the CPU has AVX-512
#: BF16), per the GEMM's multiply (`_core.w4_gemm_arith()`). "bf16" (AMD): on Zen 5, bf16 x,
#: 2 threads, the VNNI GEMV (passes of 4 rows) took 1/1.6 / 1/1.4 / 1/1.2 of the GEMM's time
#: at 8 / 9 / 12 rows at 4096 x 4096 (1/1.4 / 1/1.1 at 8 / 12 at 2048 x 2048), 1/0.9 at 16;
#: float32 x (two bf16 terms in the GEMM) gains more from the GEMV. "fma" (Intel): on a Xeon
#: of family 6 model 207, 2 threads, the GEMV took 0.78-0.91 of the GEMM's time at 24 rows
#: (4096 x 4096, 2048 x 2048, 11008 x 4096; bf16 and float32 x), 0.98-1.11 at 32, 1.08-1.28
#: at 64; from 32 rows the GEMM, whose bf16 products are exact, at about the same speed. Where
#: the GEMV is the AVX2 integer kernel (AVX-512 without VNNI, as Skylake-SP), run as such a CPU
#: on that Xeon (4096 x 4096, bf16 x, two runs): the GEMV took 0.92-0.95 of the GEMM's time at
#: 16-20 rows, 1.08-1.15 at 24, 1.29-1.45 at 28-32.
GEMM_MIN_ROWS = {"bf16": 13, "fma": 32, "fma without vnni": 24}
#: Rows of W dequantized at a time for larger batches and for the gradient.
DEQUANT_BLOCK_ROWS = 1024


def quantize(
    weight: torch.Tensor, group_size: int, zero_point: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The packed codes, scales and zeros of ``weight``; the kernel refuses NaN and infinity
    (in the pass that finds each group's range: a separate ``isfinite`` check read a 45M-entry
    weight four times and took 1.5x the quantization itself)."""
    if weight.dtype not in KERNEL_DTYPES:  # float64: beyond float32's range is an overflow
        return reference.quantize(weight, group_size, zero_point)
    n, k = weight.shape
    groups = -(-k // group_len(k, group_size))
    shape, dtype = packed_shape(n, k, CPU_BLOCKS)
    packed = torch.empty(shape, dtype=dtype)
    scales = torch.empty(n, groups)
    zeros = torch.empty(n, groups, dtype=torch.uint8)
    # 16-bit weights are read as they are (widened in registers, no float32 copy).
    _core.w4_quantize(weight.contiguous(), n, k, group_size, zero_point, packed, scales, zeros)
    return packed, scales, zeros


def _weight_blocks(packed, scales, zeros, k: int, group_size: int):
    """(n0, n1, W_hat[n0:n1] float32) over the rows of the weight (one reused buffer)."""
    n = packed.shape[0]
    block = torch.empty(min(n, DEQUANT_BLOCK_ROWS), k)
    for n0 in range(0, n, DEQUANT_BLOCK_ROWS):
        n1 = min(n, n0 + DEQUANT_BLOCK_ROWS)
        out = block[: n1 - n0]
        _core.w4_dequantize(packed, scales, zeros, n, k, group_size, n0, n1, out)
        yield n0, n1, out


#: The scales' dtypes the Rust kernels read as they are.
_SCALE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _operands(packed, scales, zeros):
    """packed, scales (in their stored dtype: no float32 copy per call) and uint8 zeros,
    contiguous, as the Rust kernels read them."""
    zeros = kernel_zeros(scales, zeros)
    scales = scales.contiguous() if scales.dtype in _SCALE_DTYPES else scales.float().contiguous()
    return packed.contiguous(), scales, zeros


def dequantize(packed, scales, zeros, k: int, group_size: int, layout: str) -> torch.Tensor:
    if layout != CPU_BLOCKS:
        return reference.dequantize(packed, scales, zeros, k, group_size, layout)
    packed, scales, zeros = _operands(packed, scales, zeros)
    n = packed.shape[0]
    out = fresh(torch.empty(n, k))
    _core.w4_dequantize(packed, scales, zeros, n, k, group_size, 0, n, out)
    return out


@functools.cache
def _gemm_min_rows() -> int:
    arith = _core.w4_gemm_arith()
    if arith == "fma" and not _core.cpu_info()["features"]["avx512vnni"]:
        arith = "fma without vnni"
    return GEMM_MIN_ROWS.get(arith, GEMM_MIN_ROWS["bf16"])


def _gemv_max_rows() -> int:
    """GEMV_MAX_ROWS, or INT_GEMV_MAX_ROWS where the GEMV runs an integer kernel (the SIMD
    path can be chosen per process, so this is asked per call)."""
    return GEMV_MAX_ROWS if _core.simd_level() == "scalar" else INT_GEMV_MAX_ROWS


def _kernel_x(x: torch.Tensor) -> torch.Tensor:
    """x as the Rust kernels read it: bf16 as it is (no float32 copy), else float32."""
    return x.contiguous() if x.dtype == torch.bfloat16 else x.float().contiguous()


def matmul(x, packed, scales, zeros, k: int, group_size: int, layout: str) -> torch.Tensor:
    if layout != CPU_BLOCKS or x.dtype not in KERNEL_DTYPES:
        return reference.matmul(x, packed, scales, zeros, k, group_size, layout)
    check_x(x, k)
    packed, scales, zeros = _operands(packed, scales, zeros)
    n = packed.shape[0]
    xk = _kernel_x(x)
    # The kernels see x [M, K] and y [M, N] as flat rows: no reshape for leading dims. They
    # write bf16 y for bf16 x (rounded once from their float32 sums), float32 y otherwise.
    y = fresh(torch.empty(*x.shape[:-1], n, dtype=xk.dtype))
    operands = (packed, scales, zeros, n, k, group_size, xk, y)
    rows = x.numel() // k
    if rows >= _gemm_min_rows() and _core.w4_gemm(*operands):
        pass
    elif rows <= _gemv_max_rows() and group_len(k, group_size) % 32 == 0:
        _core.w4_gemv(*operands)
    else:
        y = fresh(torch.empty(*x.shape[:-1], n))
        x2, y2 = x.float().reshape(-1, k), y.view(-1, n)
        weight = (packed, scales, zeros, k, group_size)
        for n0, n1, block in _weight_blocks(*weight):
            y2[:, n0:n1] = x2 @ block.T
        _recompute_overflowed(x2, y2, weight)
    return as_dtype(y, x.dtype)


def _recompute_overflowed(x2, y2, weight) -> None:
    """Outputs whose float32 sum overflowed while x's row is finite, recomputed in float64:
    infinite only where the exact result is (the GEMV does the same in Rust)."""
    if bool(y2.isfinite().all()):
        return
    rows = (~y2.isfinite().all(1) & x2.isfinite().all(1)).nonzero()[:, 0]
    if rows.numel():
        packed, scales, zeros, k, group_size = weight
        n = packed.shape[0]
        w_hat = torch.empty(n, k)
        _core.w4_dequantize(packed, scales, zeros, n, k, group_size, 0, n, w_hat)
        exact = (x2[rows].double() @ w_hat.double().T).float()
        y2[rows] = torch.where(y2[rows].isfinite(), y2[rows], exact)


def matmul_backward(grad, packed, scales, zeros, k: int, group_size: int, layout: str):
    if layout != CPU_BLOCKS or grad.dtype not in KERNEL_DTYPES:
        return reference.matmul_backward(grad, packed, scales, zeros, k, group_size, layout)
    packed, scales, zeros = _operands(packed, scales, zeros)
    dy = grad.reshape(-1, packed.shape[0])
    # bf16 gradients meet bf16 blocks of W_hat in torch's bf16 matmul where that is the faster
    # one here (ops/_matmul.py; rounding W_hat to bf16 costs what rounding dx to bf16 does),
    # the blocks' products summed in float32.
    half = dy.dtype == torch.bfloat16 and bf16_matmul_is_faster()
    dy = dy if half else dy.float()
    dx = fresh(torch.empty(dy.shape[0], k)).zero_()
    for n0, n1, block in _weight_blocks(packed, scales, zeros, k, group_size):
        if half:
            dx += dy[:, n0:n1] @ block.bfloat16()
        else:
            dx.addmm_(dy[:, n0:n1], block)
    return dx.to(grad.dtype).view(*grad.shape[:-1], k)
