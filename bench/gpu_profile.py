"""Where the GPU paths spend their time, for bench/gpu_check.sh.

``host``: the host's share of one call of each op (cProfile over 200 synchronized calls, top
functions by own time): what a small kernel pays on top of its device time.
``kernels``: one launch of each kernel of kernels/ at the benchmark shapes (bench/cce.py,
bench/w4a16.py, bench/shiftquant.py), to run under Nsight Compute:
``ncu --clock-control none --section SpeedOfLight ... python bench/gpu_profile.py kernels``.
"""

from __future__ import annotations

import cProfile
import pstats
import sys

import torch

import ferrograd as fg
from ferrograd.ops.shiftquant import matmul_2d


def w4a16_call(m: int, n: int = 8192, k: int = 8192):
    w = (torch.randn(n, k, device="cuda") / k**0.5).to(torch.bfloat16)
    q = fg.quant.quantize_w4(w, 128)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    return lambda: fg.w4a16_matmul(x, q)


def host() -> None:
    call = w4a16_call(1)
    for _ in range(20):
        call()
    torch.cuda.synchronize()
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(200):
        call()
        torch.cuda.synchronize()
    profile.disable()
    print("w4a16_matmul bf16 M=1 8192 x 8192, 200 calls:")
    pstats.Stats(profile).sort_stats("tottime").print_stats(25)


def kernels() -> None:
    for m in (1, 128):
        w4a16_call(m)()
    n, d, v = 8192, 2304, 256000  # Gemma 2 2B's head
    e = (torch.randn(n, d, device="cuda") * 0.5).to(torch.bfloat16).requires_grad_()
    c = (torch.randn(v, d, device="cuda") / d**0.5).to(torch.bfloat16).requires_grad_()
    fg.linear_cross_entropy(e, c, torch.randint(0, v, (n,), device="cuda")).backward()
    x = torch.randn(8192, 4096, device="cuda", dtype=torch.bfloat16)
    wq = fg.shiftquant(torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16))
    matmul_2d(fg.shiftquant(x), wq, None, torch.bfloat16)
    torch.cuda.synchronize()


if __name__ == "__main__":
    {"host": host, "kernels": kernels}[sys.argv[1]]()
