"""The CUDA side of W4A16: the weight layout of kernels/w4a16.cu and the kernel's launch plan.

Layout: ``qweight`` int32 [N, K / 8]; word j of row n holds the stored codes of columns
8j .. 8j + 7 in nibbles 0 .. 7 (so byte t holds columns 8j + 2t and 8j + 2t + 1, the pair one
lane of an m16n8k16 B fragment needs). Scales in x's dtype, zeros uint8 [N, G] (8 for the
symmetric scheme). The kernel needs K % 32 == 0 and a group size that is a multiple of 32.

``emulate`` runs the kernel's exact decomposition (blocks, warps, lanes, fragments, split-K) in
torch on any device, so the index arithmetic is tested on machines without a GPU.
"""

from __future__ import annotations

import torch

from ..quant.w4 import group_len
from ._mma_emulation import LANES, mma_16816, row_pairs

__all__ = ["BLOCK_N", "STEP_K", "emulate", "launch_plan", "matmul", "pack_gpu", "supports"]

#: Columns of W per block (4 warps x 4 n8 tiles) and columns of K per step (kernels/w4a16.cu).
BLOCK_N = 128
STEP_K = 32
#: Blocks to aim for when choosing the split of K (about two waves on 132 SMs).
TARGET_BLOCKS = 264


def supports(k: int, group_size: int) -> bool:
    """Whether the kernel takes this shape (else the caller dequantizes into torch's matmul)."""
    group = group_len(k, group_size)
    return k % STEP_K == 0 and group % STEP_K == 0


def pack_gpu(stored_codes: torch.Tensor) -> torch.Tensor:
    """Stored codes uint8 [N, K] (0..15, K % 8 == 0) -> qweight int32 [N, K / 8]."""
    n, k = stored_codes.shape
    nibbles = stored_codes.view(n, k // 8, 8).to(torch.int64)
    shifts = 4 * torch.arange(8, device=stored_codes.device)
    words = (nibbles << shifts).sum(-1)
    return (words - ((words >> 31) << 32)).to(torch.int32)  # two's complement of 32 bits


def operands(w, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(qweight, scales in ``dtype``, zeros) of a CUDA W4Weight, built once per dtype."""
    if dtype not in w.cuda_operands:
        from ..quant.w4 import unpack_torch

        qweight = pack_gpu(unpack_torch(w.packed, w.shape[1]))
        scales, zeros = (t.to(w.device) for t in w.kernel_params())
        w.cuda_operands[dtype] = (qweight, scales.to(dtype).contiguous(), zeros)
    return w.cuda_operands[dtype]


def matmul(x: torch.Tensor, w) -> torch.Tensor:
    """x [M, K] float16 / bfloat16 on a GPU @ W_hat.T through kernels/w4a16.cu -> [M, N]."""
    from .. import cuda

    m, k = x.shape
    n = w.shape[0]
    qweight, scales, zeros = operands(w, x.dtype)
    out = torch.zeros(m, n, dtype=torch.float32, device=x.device)
    grid, per_split = launch_plan(m, n, k)
    group = w.group_len
    t = "__half" if x.dtype == torch.float16 else "__nv_bfloat16"
    gemm = cuda.kernel("w4a16.cu", "w4a16_gemm", {"W4_T": t})
    gemm(grid, (128,), [x.contiguous(), qweight, scales, zeros, out, m, n, k, group, per_split])
    return out.to(x.dtype)


def launch_plan(m: int, n: int, k: int) -> tuple[tuple[int, int, int], int]:
    """(grid, 32-column steps per K slice): split K until the grid fills the GPU."""
    blocks = -(-n // BLOCK_N) * -(-m // 16)
    steps = k // STEP_K
    splits = max(1, min(steps, TARGET_BLOCKS // max(blocks, 1)))
    per_split = -(-steps // splits)
    return (-(-n // BLOCK_N), -(-m // 16), -(-steps // per_split)), per_split


def _pairs(words: torch.Tensor, tig: torch.Tensor) -> torch.Tensor:
    """The two 4-bit codes in byte ``tig`` of each int32 word, as (..., 2) int64."""
    byte = (words.to(torch.int64) >> (8 * tig)) & 0xFF
    return torch.stack([byte & 0xF, byte >> 4], -1)


def emulate(x, qweight, scales, zeros, group_size: int) -> torch.Tensor:
    """What kernels/w4a16.cu computes, fragment by fragment, in float32 (the weight rounded to
    x's dtype as the kernel rounds it): y [M, N]."""
    m, k = x.shape
    n = qweight.shape[0]
    group = group_len(k, group_size)
    grid, per_split = launch_plan(m, n, k)
    out = torch.zeros(m, n, dtype=torch.float32, device=x.device)
    gid, tig = (t.to(x.device) for t in LANES)
    for bx in range(grid[0]):
        for by in range(grid[1]):
            for bz in range(grid[2]):
                steps = range(bz * per_split, min(k // STEP_K, (bz + 1) * per_split))
                for warp in range(4):
                    col0 = bx * BLOCK_N + warp * 32
                    _warp(x, qweight, scales, zeros, group, out, by * 16, col0, steps, gid, tig)
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
