"""The CUDA kernel: kernels/w4a16.cu (mma.sync tensor cores, in-register dequantization,
split-K, 16 or 64 rows of x per block) for float16 / bfloat16 x and weights in the ``gpu_words``
layout (weight.py) when K and the group length are multiples of 32 and ferrograd can launch
kernels here; other CUDA inputs run the reference (dequantize, then torch's matmul), as the
gradient of x always does.

The kernel reads scales in x's dtype and zeros uint8 [N, G] (8 for the symmetric scheme) and
accumulates into a float32 [M, N] buffer that split-K blocks add into. It takes scales stored in
x's dtype or in float16 (whose normal range both 16-bit types hold); float32 scales (a weight
whose scales no 16-bit type holds, weight.py) and bfloat16 scales with float16 x run the
reference, since converting them could overflow or flush them.
"""

from __future__ import annotations

import torch

from ... import cuda
from . import reference
from .weight import GPU_WORDS, check_x, group_len, kernel_zeros

__all__ = ["BLOCK_N", "STEP_K", "launch_plan", "matmul", "supports"]

#: Columns of W per block (4 warps x 4 n8 tiles) and columns of K per step (kernels/w4a16.cu).
BLOCK_N = 128
STEP_K = 32
#: Rows of x per block of each entry point: one m16 tile up to 16 rows (decode: the weight's
#: bytes are the cost), else four, so that each dequantized fragment of W feeds four mma.
ENTRY_ROWS = {"w4a16_gemm": 16, "w4a16_gemm_m64": 64}
#: Blocks to aim for per SM when choosing the split of K: the kernel waits on its weight loads,
#: so the grid should keep every SM full (on an H200 its registers let an SM hold 5 blocks of
#: w4a16_gemm: eight per SM is about 1.6 waves; bench/results/gpu_check.md).
BLOCKS_PER_SM = 8
_TYPES = {torch.float16: "__half", torch.bfloat16: "__nv_bfloat16"}


def supports(k: int, group_size: int) -> bool:
    """Whether the kernel takes this shape (else the reference dequantizes into a matmul)."""
    return k % STEP_K == 0 and group_len(k, group_size) % STEP_K == 0


def launch_plan(m: int, n: int, k: int, sms: int = 132) -> tuple[str, tuple[int, int, int], int]:
    """(entry point, grid, 32-column steps per K slice) on a GPU of ``sms`` multiprocessors:
    split K until the grid holds about ``BLOCKS_PER_SM`` blocks per SM."""
    entry = "w4a16_gemm" if m <= 16 else "w4a16_gemm_m64"
    col_blocks, row_blocks = -(-n // BLOCK_N), -(-m // ENTRY_ROWS[entry])
    steps = k // STEP_K
    splits = max(1, min(steps, BLOCKS_PER_SM * sms // (col_blocks * row_blocks)))
    per_split = -(-steps // splits)
    return entry, (col_blocks, row_blocks, -(-steps // per_split)), per_split


def matmul(x, packed, scales, zeros, k: int, group_size: int, layout: str) -> torch.Tensor:
    check_x(x, k)
    if not (
        layout == GPU_WORDS
        and x.dtype in _TYPES
        and scales.dtype in (x.dtype, torch.float16)
        and x.numel() > 0  # an empty grid is no launch
        and supports(k, group_size)
        and cuda.is_available()
    ):
        return reference.matmul(x, packed, scales, zeros, k, group_size, layout)
    n = packed.shape[0]
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    out = torch.zeros(m, n, dtype=torch.float32, device=x.device)
    entry, grid, per_split = launch_plan(m, n, k, cuda.multiprocessors(x.device))
    gemm = cuda.kernel("w4a16.cu", entry, {"W4_T": _TYPES[x.dtype]})
    operands = (packed.contiguous(), scales.to(x.dtype).contiguous(), kernel_zeros(scales, zeros))
    gemm(grid, (128,), [x2, *operands, out, m, n, k, group_len(k, group_size), per_split])
    return out.to(x.dtype).view(*x.shape[:-1], n)
