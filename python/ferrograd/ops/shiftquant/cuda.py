"""The CUDA kernels: launches of kernels/shiftquant.cu and the GEMM's operand layout.

The quantizers read float32 / float16 / bfloat16 directly and give the CPU kernels' codes, scales
and shifts bit for bit (nearest and stochastic rounding alike). The GEMM (int8 tensor cores,
mma.sync m16n8k32) needs K and the group size to be multiples of 32: ``gemm_operand`` pads each
group with zero codes (which add nothing) when they are not, and lays the shifts out transposed,
[groups, rows padded to 16]; its epilogue writes float32 / float16 / bfloat16.
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ... import cuda

__all__ = [
    "COL_ROWS",
    "COL_TILE",
    "GEMM_BLOCK",
    "GEMM_SMEM",
    "GEMM_THREADS",
    "GemmOperand",
    "gemm",
    "gemm_operand",
    "matmul",
    "quantize",
    "rows_plan",
]

#: Outputs per block side, threads and dynamic shared memory of sq_gemm (kernels/shiftquant.cu).
GEMM_BLOCK = 128
GEMM_THREADS = 256
GEMM_SMEM = 83968
#: Columns per block of the column quantizers, and the rows a block aims to own.
COL_TILE = 32
COL_ROWS = 512
#: The most blocks along a grid's y (and z) axis.
_GRID_Y_MAX = 65535

_SUFFIX = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


def _kernel(name: str, dtype: torch.dtype):
    return cuda.kernel("shiftquant.cu", f"{name}_{_SUFFIX[dtype]}")


def rows_plan(length: int, group_size: int) -> tuple[int, int]:
    """(threads per block, lanes per group) of sq_quantize_rows for rows of ``length``: about
    16 elements per thread, and a power of two of lanes (at most 32) sharing each group."""
    lanes = 1 << min(5, (group_size // 4).bit_length() - 1)
    threads = 32
    while threads < 256 and threads * 16 < length:
        threads *= 2
    return threads, lanes


def quantize(
    x: torch.Tensor,
    bits: int,
    group_size: int,
    seed: int | None,
    transposed: bool,
    slot: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """codes, scale, shifts of a CUDA matrix [R, C] along C (or along R with ``transposed``:
    then of shape [C, R], as the quantization of x.T). ``seed`` None rounds to nearest.
    ``slot`` (cpu.py's workspace) is not needed here: torch's caching allocator reuses memory."""
    if x.dtype not in _SUFFIX:
        x = x.float()
    x = x.contiguous()
    rows, length = x.shape[::-1] if transposed else x.shape
    groups = math.ceil(length / group_size)
    dev = x.device
    codes = torch.empty((rows, length), dtype=torch.int8, device=dev)
    scale = torch.zeros(rows, dtype=torch.float32, device=dev)
    shifts = torch.empty((rows, groups), dtype=torch.uint8, device=dev)
    if rows == 0 or length == 0:
        return codes, scale, shifts
    qmax = float(2 ** (bits - 1) - 1)
    rounding = [int(seed is not None), ctypes.c_uint64(seed or 0)]
    if not transposed:
        threads, lanes = rows_plan(length, group_size)
        # Vector loads of 4 elements need rows (and a view's start) aligned to them.
        vec = int(length % 4 == 0 and x.data_ptr() % (4 * x.element_size()) == 0)
        args = [x, codes, scale, shifts, length, group_size, lanes, vec, qmax, *rounding]
        _kernel("sq_quantize_rows", x.dtype)((rows,), (threads,), args)
        return codes, scale, shifts
    r, c = x.shape
    per_block = max(1, COL_ROWS // group_size)
    grid = (math.ceil(c / COL_TILE), math.ceil(groups / per_block))
    if grid[1] > _GRID_Y_MAX:
        raise ValueError(f"shiftquant: {r} rows in groups of {group_size} are too many for CUDA")
    gmax = torch.empty((c, groups), dtype=torch.int32, device=dev)
    colmax = torch.zeros(c, dtype=torch.int32, device=dev)
    smem = per_block * COL_TILE * 4
    plan = [r, c, group_size, per_block]
    _kernel("sq_col_max", x.dtype)(grid, (256,), [x, gmax, colmax, *plan], smem)
    _kernel("sq_quantize_cols", x.dtype)(
        grid, (256,), [x, gmax, colmax, codes, scale, shifts, *plan, qmax, *rounding], smem
    )
    return codes, scale, shifts


def quantize_with_col_sums(
    x: torch.Tensor, bits: int, group_size: int, seed: int | None, slot: int | None = None
) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """``quantize(x, ..., transposed=True)`` and the float32 sums of x's columns."""
    return quantize(x, bits, group_size, seed, True), x.sum(0, dtype=torch.float32)


@dataclass(frozen=True)
class GemmOperand:
    """One operand of sq_gemm: codes [rows, k] with k and the group size multiples of 32,
    scale [rows], shifts_t uint8 [groups, rows_padded] (rows_padded a multiple of 16)."""

    codes: torch.Tensor
    scale: torch.Tensor
    shifts_t: torch.Tensor
    group_size: int

    @property
    def rows(self) -> int:
        return self.codes.shape[0]

    @property
    def k(self) -> int:
        return self.codes.shape[1]


def gemm_operand(
    codes: torch.Tensor, scale: torch.Tensor, shifts: torch.Tensor, group_size: int
) -> GemmOperand:
    """The layout sq_gemm reads, from a 2-D ShiftQuant operand (any device): groups padded with
    zero codes to a multiple of 32, then K padded to a multiple of 32, shifts transposed."""
    rows, k = codes.shape
    groups = shifts.shape[1]
    if group_size % 32:
        padded = -(-group_size // 32) * 32
        whole = F.pad(codes, (0, groups * group_size - k)).view(rows, groups, group_size)
        codes = F.pad(whole, (0, padded - group_size)).reshape(rows, groups * padded)
        group_size = padded
    elif k % 32:
        codes = F.pad(codes, (0, 32 - k % 32))
    codes = codes.contiguous()
    if codes.data_ptr() % 16:  # an offset view: the cp.async loads need 16-byte rows
        codes = codes.clone()
    shifts_t = torch.zeros((groups, -(-rows // 16) * 16), dtype=torch.uint8, device=codes.device)
    shifts_t[:, :rows] = shifts.T
    return GemmOperand(codes, scale.float().contiguous(), shifts_t, group_size)


def gemm(a: GemmOperand, b: GemmOperand, bias: torch.Tensor | None, dtype: torch.dtype):
    """[a.rows, b.rows] = a @ b.T (+ bias) in ``dtype`` (float32 / float16 / bfloat16)."""
    m, n = a.rows, b.rows
    out = torch.empty((m, n), dtype=dtype, device=a.codes.device)
    if m == 0 or n == 0:
        return out
    grid = (math.ceil(n / GEMM_BLOCK), math.ceil(m / GEMM_BLOCK))
    if grid[1] > _GRID_Y_MAX:
        raise ValueError(f"shiftquant_matmul: {m} rows are too many for one CUDA launch")
    bias_arg = ctypes.c_void_p(0) if bias is None else bias.float().contiguous()
    args = [a.codes, a.scale, a.shifts_t, m, a.shifts_t.shape[1]]
    args += [b.codes, b.scale, b.shifts_t, n, b.shifts_t.shape[1], bias_arg, out, a.k, a.group_size]
    _kernel("sq_gemm", dtype)(grid, (GEMM_THREADS,), args, GEMM_SMEM)
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
    """[M, N] = a @ b.T (+ bias) in ``dtype`` for 2-D operands quantized along K."""
    a = gemm_operand(a_codes, a_scale, a_shifts, group_size)
    b = gemm_operand(b_codes, b_scale, b_shifts, group_size)
    return gemm(a, b, bias, dtype)
