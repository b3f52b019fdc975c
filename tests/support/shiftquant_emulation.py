"""sq_gemm (kernels/shiftquant.cu) emulated in torch, block by block, warp by warp and fragment
by fragment, with the kernel's own index expressions: the CPU-side check of its arithmetic."""

from __future__ import annotations

import torch

from ferrograd.ops.shiftquant.cuda import GEMM_BLOCK, GemmOperand

from .mma import LANES, lane_outputs

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
