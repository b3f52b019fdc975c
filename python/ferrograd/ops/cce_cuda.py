"""The CUDA forward of cut cross-entropy (kernels/cce.cu): per row the log-sum-exp, the target
logit and the logit sum of e · cᵀ + bias (softcapped) for fp16 / bf16 inputs with D % 16 == 0,
without any [N, V] buffer: partial (max, Σ exp) per (row, vocabulary split, warp) merged by one
logsumexp over the [splits x 4, N] partials.

``emulate`` runs the kernel's exact decomposition in torch (tested on the CPU).
"""

from __future__ import annotations

import ctypes
import math

import torch

from ._mma_emulation import LANES, mma_16816, row_pairs

__all__ = ["BLOCK_V", "emulate", "forward", "launch_plan", "supports"]

#: Vocabulary entries per tile (4 warps x 4 n8 tiles) and per block of rows.
BLOCK_V = 128
BLOCK_ROWS = 16
WARPS = 4
#: Blocks to aim for when splitting the vocabulary (about four waves on 132 SMs).
TARGET_BLOCKS = 528


def supports(e: torch.Tensor) -> bool:
    return e.is_cuda and e.dtype in (torch.float16, torch.bfloat16) and e.shape[1] % 16 == 0


def launch_plan(n: int, v: int) -> tuple[tuple[int, int], int]:
    """(grid, vocabulary tiles per split): split the vocabulary until the grid fills the GPU."""
    row_blocks = -(-n // BLOCK_ROWS)
    tiles = -(-v // BLOCK_V)
    splits = max(1, min(tiles, TARGET_BLOCKS // max(row_blocks, 1)))
    per_split = -(-tiles // splits)
    return (row_blocks, -(-tiles // per_split)), per_split


def _merge(part_max: torch.Tensor, part_sum: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(part_max + torch.log(part_sum), dim=0)


def forward(e, c, bias, targets, softcap, want_sum):
    """(lse, target logit, logit sum or None), float32 [N] each, through kernels/cce.cu."""
    from .. import cuda

    n, d = e.shape
    v = c.shape[0]
    grid, per_split = launch_plan(n, v)
    slots = grid[1] * WARPS
    f32 = {"dtype": torch.float32, "device": e.device}
    part_max, part_sum = torch.empty(slots, n, **f32), torch.empty(slots, n, **f32)
    target_logit = torch.zeros(n, **f32)
    logit_sum = torch.zeros(n, **f32) if want_sum else None
    t = "__half" if e.dtype == torch.float16 else "__nv_bfloat16"
    kernel = cuda.kernel("cce.cu", "cce_forward", {"CCE_T": t})
    null = ctypes.c_void_p(0)  # the kernel skips bias and sums given null pointers
    args = [e.contiguous(), c.contiguous(), null if bias is None else bias.contiguous(), targets,
            part_max, part_sum, target_logit, null if logit_sum is None else logit_sum,
            n, v, d, per_split, 0.0 if softcap is None else float(softcap)]  # fmt: skip
    kernel(grid, (WARPS * 32,), args)
    return _merge(part_max, part_sum), target_logit, logit_sum


def emulate(e, c, bias, targets, softcap, want_sum):
    """What kernels/cce.cu computes, lane by lane in the kernel's order, in float32."""
    n, d = e.shape
    v = c.shape[0]
    grid, per_split = launch_plan(n, v)
    gid, tig = LANES
    part_max = torch.full((grid[1] * WARPS, n), -math.inf)
    part_sum = torch.zeros(grid[1] * WARPS, n)
    target_logit = torch.zeros(n)
    logit_sum = torch.zeros(n)
    tiles = -(-v // BLOCK_V)
    for bx in range(grid[0]):
        ra, rb = bx * BLOCK_ROWS + gid, bx * BLOCK_ROWS + gid + 8
        for by in range(grid[1]):
            for warp in range(WARPS):
                state = torch.tensor([[-math.inf, 0.0, 0.0]]).repeat(32, 2, 1)  # max, sum, zsum
                for tile in range(by * per_split, min(tiles, (by + 1) * per_split)):
                    col0 = tile * BLOCK_V + warp * 32
                    acc = torch.zeros(4, 32, 4)
                    for k in range(0, d, 16):
                        kk = k + tig * 2
                        a = [row_pairs(e, r, c_) for c_ in (kk, kk + 8) for r in (ra, rb)]
                        for t in range(4):
                            col = col0 + t * 8 + gid
                            acc[t] += mma_16816(
                                a, [row_pairs(c, col, kk), row_pairs(c, col, kk + 8)]
                            )
                    _fold(acc, col0, v, bias, softcap, targets, ra, rb, state, target_logit)
                slot = by * WARPS + warp
                for half, rows in enumerate((ra, rb)):
                    m, s, z = _merge_lanes(state[:, half])
                    keep = (rows < n) & (tig == 0)
                    part_max[slot, rows[keep]] = m[keep]
                    part_sum[slot, rows[keep]] = s[keep]
                    logit_sum.index_put_((rows[keep],), z[keep], accumulate=True)
    return _merge(part_max, part_sum), target_logit, logit_sum if want_sum else None


def _fold(acc, col0, v, bias, softcap, targets, ra, rb, state, target_logit):
    """The kernel's per-lane epilogue of one vocabulary tile: bias, softcap, online (max, sum)."""
    n = targets.shape[0]
    _, tig = LANES
    for lane in range(32):
        for t in range(4):
            for i in range(4):
                col = col0 + t * 8 + 2 * int(tig[lane]) + (i & 1)
                if col >= v:
                    continue
                z = float(acc[t, lane, i]) + (float(bias[col]) if bias is not None else 0.0)
                if softcap:
                    z = softcap * math.tanh(z / softcap)
                row = int((ra if i < 2 else rb)[lane])
                m, s, zs = state[lane, i // 2].tolist()
                if z != -math.inf:
                    s = s * math.exp(m - z) + 1.0 if z > m else s + math.exp(z - m)
                    m = max(m, z)
                state[lane, i // 2] = torch.tensor([m, s, zs + z])
                if row < n and col == int(targets[row]):
                    target_logit[row] = z


def _merge_lanes(state: torch.Tensor):
    """The shuffle merge over the four lanes of each group: per lane (max, sum, zsum)."""
    m, s, z = state[:, 0].clone(), state[:, 1].clone(), state[:, 2].clone()
    lane = torch.arange(32)
    for offset in (1, 2):
        other = lane ^ offset
        om, os_, oz = m[other], s[other], z[other]
        mm = torch.maximum(m, om)
        finite = mm != -math.inf
        s = torch.where(finite, s * torch.exp(m - mm) + os_ * torch.exp(om - mm), 0.0)
        m, z = mm, z + oz
    return m, s, z
