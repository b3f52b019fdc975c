"""mma.sync m16n8k16 emulated on per-lane fragments (the PTX ISA layouts), in torch: the CPU-side
check of the CUDA kernels' index arithmetic."""

from __future__ import annotations

import torch

#: (groupID, threadID_in_group) of the 32 lanes of a warp.
LANES = (torch.arange(32) >> 2, torch.arange(32) & 3)


def mma_16816(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """D = A (16x16) · B (16x8) from fragments held per lane: ``a`` four (32, 2) pairs (rows g,
    g + 8 at columns 2t, 2t + 1, then the same at columns + 8), ``b`` two (32, 2) pairs (rows 2t,
    2t + 1 and + 8 of column g); returns (32, 4): each lane's c0..c3 (row g columns 2t, 2t + 1,
    then row g + 8)."""
    gid, tig = (t.to(a[0].device) for t in LANES)
    a_mat = torch.zeros(16, 16, device=gid.device)
    b_mat = torch.zeros(16, 8, device=gid.device)
    g, k = gid[:, None], 2 * tig[:, None] + torch.arange(2, device=gid.device)
    a_mat[g, k], a_mat[g + 8, k], a_mat[g, k + 8], a_mat[g + 8, k + 8] = a
    b_mat[k, g], b_mat[k + 8, g] = b
    return lane_outputs(a_mat @ b_mat)


def lane_outputs(c: torch.Tensor) -> torch.Tensor:
    """The m16n8 accumulator fragments of C (16x8, every mma shape): (32, 4), each lane's c0..c3
    (row g columns 2t, 2t + 1, then row g + 8)."""
    gid, tig = (t.to(c.device) for t in LANES)
    rows = torch.stack([gid, gid, gid + 8, gid + 8], 1)
    cols = torch.stack([2 * tig, 2 * tig + 1, 2 * tig, 2 * tig + 1], 1)
    return c[rows, cols]


def row_pairs(mat: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """(32, 2) float32: mat[row, col] and mat[row, col + 1] per lane; 0 for rows past the end
    (what the kernels' guarded 4-byte loads give)."""
    valid = (rows < mat.shape[0])[:, None]
    pair = cols[:, None] + torch.arange(2, device=mat.device)
    vals = mat[rows.clamp(max=mat.shape[0] - 1)[:, None], pair].float()
    return torch.where(valid, vals, 0.0)
