"""kernels/w4a16.cu's exact decomposition (blocks, warps, lanes, fragments, split-K) run in torch
on any device, so its index arithmetic is tested on machines without a GPU."""

from __future__ import annotations

import torch

from ferrograd.ops.w4a16.cuda import BLOCK_N, ENTRY_ROWS, STEP_K, launch_plan
from ferrograd.ops.w4a16.weight import group_len

from .mma import LANES, mma_16816, row_pairs


def _pairs(words: torch.Tensor, tig: torch.Tensor) -> torch.Tensor:
    """The two 4-bit codes in byte ``tig`` of each int32 word, as (..., 2) int64."""
    byte = (words.to(torch.int64) >> (8 * tig)) & 0xFF
    return torch.stack([byte & 0xF, byte >> 4], -1)


def emulate(x, qweight, scales, zeros, group_size: int) -> torch.Tensor:
    """What kernels/w4a16.cu computes, fragment by fragment, in float32 (the weight rounded to
    x's dtype as the kernel rounds it): y [M, N] from x [M, K], qweight in the ``gpu_words``
    layout, scales in x's dtype and zeros uint8 [N, G] (8 for the symmetric scheme)."""
    m, k = x.shape
    n = qweight.shape[0]
    group = group_len(k, group_size)
    entry, grid, per_split = launch_plan(m, n, k)
    out = torch.zeros(m, n, dtype=torch.float32, device=x.device)
    gid, tig = (t.to(x.device) for t in LANES)
    rows = ENTRY_ROWS[entry]
    for bx in range(grid[0]):
        for by in range(grid[1]):
            for bz in range(grid[2]):
                steps = range(bz * per_split, min(k // STEP_K, (bz + 1) * per_split))
                for warp in range(4):
                    col0 = bx * BLOCK_N + warp * 32
                    for row0 in range(by * rows, (by + 1) * rows, 16):  # the warp's m16 tiles
                        _warp(x, qweight, scales, zeros, group, out, row0, col0, steps, gid, tig)
    return out


def _warp(x, qweight, scales, zeros, group, out, row0, col0, steps, gid, tig):
    m, _ = x.shape
    n = qweight.shape[0]
    ra, rb = row0 + gid, row0 + gid + 8

    acc = torch.zeros(4, 32, 4, device=x.device)  # tile, lane, c0..c3
    for step in steps:
        kbase = step * STEP_K
        g = kbase // group
        for t in range(4):
            cols = col0 + t * 8 + gid
            valid = cols < n
            c = cols.clamp(max=n - 1)
            words = qweight[c, kbase // 8 : kbase // 8 + 4]  # (32, 4)
            scale = torch.where(valid, scales[c, g].float(), 0.0)[:, None]
            zero = torch.where(valid, zeros[c, g].float(), 0.0)[:, None]
            words = torch.where(valid[:, None], words, 0)
            for h in range(2):
                kk = kbase + h * 16 + tig * 2
                a = [row_pairs(x, r, c) for c in (kk, kk + 8) for r in (ra, rb)]
                b = [
                    ((_pairs(words[:, 2 * h + j], tig) - zero) * scale).to(x.dtype).float()
                    for j in range(2)
                ]
                acc[t] += mma_16816(a, b)
    for t in range(4):
        col = col0 + t * 8 + tig * 2
        for i in range(4):
            r = ra if i < 2 else rb
            cc = col + (i & 1)
            keep = (r < m) & (cc < n)
            out.index_put_((r[keep], cc[keep]), acc[t, keep, i], accumulate=True)
