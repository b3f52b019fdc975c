"""Launches every entry point of kernels/*.cu once on small, edge-shaped inputs (ragged tiles,
short groups, padded operands), for compute-sanitizer: `compute-sanitizer --tool memcheck
python tests/cuda/sanitize_kernels.py` (also racecheck, initcheck). Exits non-zero on a failure
of its own checks; the sanitizer reports its findings itself."""

from __future__ import annotations

import torch

import ferrograd as fg
from ferrograd.ops.shiftquant import matmul_2d, quantize_2d


def shiftquant() -> None:
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = torch.randn(67, 203, device="cuda").to(dtype)
        for group_size, seed in ((4, None), (48, 3), (64, None), (256, 5)):
            quantize_2d(x, 6, group_size, seed)
            quantize_2d(x, 6, group_size, seed, transposed=True)
    for out in (torch.float32, torch.float16, torch.bfloat16):
        for m, n, k, group_size in ((1, 9, 64, 64), (130, 129, 96, 32), (50, 40, 200, 48)):
            qa = fg.shiftquant(torch.randn(m, k, device="cuda"), group_size=group_size)
            qb = fg.shiftquant(torch.randn(n, k, device="cuda"), group_size=group_size)
            matmul_2d(qa, qb, torch.randn(n, device="cuda"), out)


def cut_cross_entropy() -> None:
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        e = torch.randn(77, 64, device="cuda", dtype=dtype, requires_grad=True)
        c = torch.randn(1001, 64, device="cuda", dtype=dtype, requires_grad=True)
        targets = torch.randint(0, 1001, (77,), device="cuda")
        fg.linear_cross_entropy(e, c, targets).backward()


def w4a16() -> None:
    for dtype in (torch.float16, torch.bfloat16):
        w = torch.randn(300, 256, device="cuda").to(dtype)
        for group_size in (32, 128):
            q = fg.quant.quantize_w4(w, group_size)
            for m in (1, 17):
                fg.w4a16_matmul(torch.randn(m, 256, device="cuda", dtype=dtype), q)


if __name__ == "__main__":
    for launch in (shiftquant, cut_cross_entropy, w4a16):
        launch()
        torch.cuda.synchronize()
        print(f"{launch.__name__}: launched")
