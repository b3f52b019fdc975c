"""The CUDA side of ShiftQuant: launch plans of kernels/shiftquant.cu, the GEMM's operand layout
and a torch emulation of the GEMM's exact fragment decomposition (tested on the CPU).

The quantizers read float32 / float16 / bfloat16 directly and give the CPU kernels' codes, scales
and shifts bit for bit (nearest and stochastic rounding alike). The GEMM needs K and the group
size to be multiples of 32: ``gemm_operand`` pads each group with zero codes (which add nothing)
when they are not, and lays the shifts out transposed, [groups, rows padded to 16].
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._mma_emulation import LANES, lane_outputs

__all__ = [
    "GEMM_SMEM",
    "GemmOperand",
    "emulate_gemm",
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
    from .. import cuda

    return cuda.kernel("shiftquant.cu", f"{name}_{_SUFFIX[dtype]}")


def rows_plan(length: int, group_size: int) -> tuple[int, int]:
    """(threads per block, lanes per group) of sq_quantize_rows for rows of ``length``: about
    16 elements per thread, and a power of two of lanes (at most 32) sharing each group."""
    lanes = 1 << min(5, (group_size // 4).bit_length() - 1)
    threads = 32
    while threads < 256 and threads * 16 < length:
        threads *= 2
    return threads, lanes


def quantize(x: torch.Tensor, bits: int, group_size: int, seed: int | None, transposed: bool):
    """codes, scale, shifts of a CUDA matrix [R, C] along C (or along R with ``transposed``:
    then of shape [C, R], as the quantization of x.T). ``seed`` None rounds to nearest."""
    x = x.detach()
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


def gemm_operand(codes: torch.Tensor, scale: torch.Tensor, shifts: torch.Tensor, group_size: int):
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


def matmul(a: GemmOperand, b: GemmOperand, bias: torch.Tensor | None, dtype: torch.dtype):
    """[a.rows, b.rows] = a @ b.T (+ bias) in ``dtype`` (float32 / float16 / bfloat16)."""
    m, n = a.rows, b.rows
    out = torch.empty((m, n), dtype=dtype, device=a.codes.device)
    if m == 0 or n == 0:
        return out
    grid = (math.ceil(n / GEMM_BLOCK), math.ceil(m / GEMM_BLOCK))
    if grid[1] > _GRID_Y_MAX:
        raise ValueError(f"shiftquant_matmul: {m} rows are too many for one CUDA launch")
    bias_arg = ctypes.c_void_p(0) if bias is None else bias.detach().float().contiguous()
    args = [a.codes, a.scale, a.shifts_t, m, a.shifts_t.shape[1]]
    args += [b.codes, b.scale, b.shifts_t, n, b.shifts_t.shape[1], bias_arg, out, a.k, a.group_size]
    _kernel("sq_gemm", dtype)(grid, (GEMM_THREADS,), args, GEMM_SMEM)
    return out


# ---- emulation of sq_gemm, fragment by fragment ----

_SLICE_STRIDE = 80  # bytes per shared-memory row (64 of data, 16 of padding)
#: The index expressions of sq_gemm, evaluated here on tensors of lanes; a test checks that
#: kernels/shiftquant.cu holds each verbatim, so the emulation runs the kernel's own arithmetic.
KERNEL_INDEX = {
    "a_row": "wm * 64 + mt * 16 + (lane & 7) + 8 * ((lane >> 3) & 1)",
    "a_byte": "s * 32 + 16 * (lane >> 4)",
    "b_row": "kBM + wn * 32 + np * 16 + (lane & 7) + 8 * (lane >> 4)",
    "b_byte": "s * 32 + 16 * ((lane >> 3) & 1)",
    "a_shift": "wm * 64 + mt * 16 + gid + 8 * h",
    "b_shift": "kBM + wn * 32 + nt * 8 + 2 * tig + h",
    "out_row": "m0 + wm * 64 + mt * 16 + gid + 8 * h",
    "out_col": "n0 + wn * 32 + nt * 8 + 2 * tig",
}


def _index(name: str, **names) -> torch.Tensor:
    return eval(KERNEL_INDEX[name], {}, {"kBM": GEMM_BLOCK, **names})


def _ldmatrix_x4(smem: torch.Tensor, addr: torch.Tensor) -> torch.Tensor:
    """ldmatrix.x4 on bytes: lanes 8q .. 8q + 7 give the 16-byte rows of matrix q (``addr``,
    one byte address per lane); lane l receives bytes 4 (l % 4) .. + 3 of row l / 4 of each
    matrix. Returns (4, 32, 4) int64: register q of each lane as its four bytes."""
    rows = smem[addr[:, None] + torch.arange(16)]  # (32 lanes, 16 bytes)
    lane = torch.arange(32)
    cols = 4 * (lane % 4)[:, None] + torch.arange(4)
    return torch.stack([rows[8 * q + lane // 4].gather(1, cols) for q in range(4)])


def _mma_16832(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """D = A (16x32 s8, row) · B (32x8 s8, col) from the PTX fragments of m16n8k32: ``a`` (4, 32,
    4) bytes, register 0: row g, k 4t + i; 1: row g + 8; 2: row g, k 16 + 4t + i; 3: row g + 8,
    k 16 + 4t + i. ``b`` (2, 32, 4): register 0: k 4t + i of column g; 1: k 16 + 4t + i.
    Returns (32, 4) int64: c0, c1 at row g, columns 2t, 2t + 1; c2, c3 at row g + 8."""
    gid, tig = LANES
    k = 4 * tig[:, None] + torch.arange(4)
    a_mat = torch.zeros(16, 32, dtype=torch.int64)
    b_mat = torch.zeros(32, 8, dtype=torch.int64)
    g = gid[:, None].expand_as(k)
    a_mat[g, k], a_mat[g + 8, k], a_mat[g, k + 16], a_mat[g + 8, k + 16] = a
    b_mat[k, g], b_mat[k + 16, g] = b
    return lane_outputs(a_mat @ b_mat)


def _stage(a: GemmOperand, b: GemmOperand, m0: int, n0: int, k0: int):
    """Shared memory of one stage as load_stage fills it: (bytes, shifts of the two steps)."""
    smem = torch.zeros((2 * GEMM_BLOCK) * _SLICE_STRIDE, dtype=torch.int64)
    for r in range(2 * GEMM_BLOCK):
        op, row = (a, m0 + r) if r < GEMM_BLOCK else (b, n0 + r - GEMM_BLOCK)
        for chunk in range(4):
            col = k0 + 16 * chunk
            if row < op.rows and col < op.k:
                start = r * _SLICE_STRIDE + 16 * chunk
                smem[start : start + 16] = op.codes[row, col : col + 16].to(torch.int64)
    shifts = torch.zeros(2, 2 * GEMM_BLOCK, dtype=torch.int64)
    for step in range(2):
        kk = k0 + 32 * step
        if kk < a.k:
            g = kk // a.group_size
            for part, (op, base) in enumerate(((a, m0), (b, n0))):
                sl = op.shifts_t[g, base : base + GEMM_BLOCK].to(torch.int64)
                shifts[step, part * GEMM_BLOCK : part * GEMM_BLOCK + sl.numel()] = sl
    return smem, shifts


def emulate_gemm(a: GemmOperand, b: GemmOperand, bias: torch.Tensor | None) -> torch.Tensor:
    """What sq_gemm computes, block by block, warp by warp and fragment by fragment: the shared
    memory layout, the ldmatrix addresses, the m16n8k32 fragments, the per-group fold and the
    epilogue, in float32 as the kernel rounds. float32 [a.rows, b.rows]."""
    m, n, k, gs = a.rows, b.rows, a.k, a.group_size
    out = torch.empty(m, n)
    lane = torch.arange(32)
    gid, tig = LANES
    tiles = -(-k // 64)
    for by in range(-(-m // GEMM_BLOCK)):
        for bx in range(-(-n // GEMM_BLOCK)):
            m0, n0 = by * GEMM_BLOCK, bx * GEMM_BLOCK
            acc = torch.zeros(8, 4, 4, 32, 4)  # warp, mt, nt, lane, c0..c3
            part = torch.zeros(8, 4, 4, 32, 4, dtype=torch.int64)
            for tile in range(tiles):
                smem, stage_shifts = _stage(a, b, m0, n0, tile * 64)
                for s in range(2):
                    step = tile * 2 + s
                    if step * 32 >= k:
                        break
                    fold = (step + 1) % (gs // 32) == 0 or (step + 1) * 32 >= k
                    for warp in range(8):
                        wm, wn = warp >> 2, warp & 3
                        at = dict(lane=lane, wm=wm, wn=wn, s=s)
                        af = []
                        for mt in range(4):
                            r = _index("a_row", mt=mt, **at)
                            addr = r * _SLICE_STRIDE + _index("a_byte", **at)
                            af.append(_ldmatrix_x4(smem, addr))
                        bf = []
                        for np_ in range(2):
                            r = _index("b_row", np=np_, **at)
                            regs = _ldmatrix_x4(smem, r * _SLICE_STRIDE + _index("b_byte", **at))
                            bf += [regs[0:2], regs[2:4]]
                        for mt in range(4):
                            for nt in range(4):
                                part[warp, mt, nt] += _mma_16832(af[mt], bf[nt])
                        if not fold:
                            continue
                        sh = stage_shifts[s]
                        at = dict(gid=gid, tig=tig, wm=wm, wn=wn)
                        for mt in range(4):
                            ka = [sh[_index("a_shift", mt=mt, h=h, **at)] for h in range(2)]
                            for nt in range(4):
                                kb = [sh[_index("b_shift", nt=nt, h=h, **at)] for h in range(2)]
                                for i in range(4):
                                    factor = torch.pow(2.0, -(ka[i >> 1] + kb[i & 1]).float())
                                    p = part[warp, mt, nt, :, i].float()  # exact below 2^24
                                    acc[warp, mt, nt, :, i] += p * factor  # the product is exact
                                    part[warp, mt, nt, :, i] = 0
            _epilogue(acc, a, b, bias, m0, n0, out)
    return out


def _epilogue(acc, a: GemmOperand, b: GemmOperand, bias, m0: int, n0: int, out: torch.Tensor):
    gid, tig = LANES
    for warp in range(8):
        at = dict(gid=gid, tig=tig, wm=warp >> 2, wn=warp & 3, m0=m0, n0=n0)
        for mt in range(4):
            for nt in range(4):
                for i in range(4):
                    row = _index("out_row", mt=mt, h=i >> 1, **at)
                    col = _index("out_col", nt=nt, **at) + (i & 1)
                    keep = (row < a.rows) & (col < b.rows)
                    r, c = row[keep], col[keep]
                    v = acc[warp, mt, nt, keep, i] * (a.scale[r] * b.scale[c])
                    if bias is not None:
                        v = v + bias.float()[c]
                    out[r, c] = v
