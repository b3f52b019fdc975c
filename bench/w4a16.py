"""W4A16: the 4-bit weight matmul against torch's int4 CPU kernel and the bf16 matmul, the W4
quantizer's throughput, and SmoothQuant+ fidelity on a small trained Transformer.

CPU (bf16 x): M in {1, 8, 32, 128} on W [N, K] in {4096 x 4096, 2048 x 2048 (a decode layer
of bench/inference.py's model, where the per-call cost shows), 11008 x 4096}, group size 128,
at 1 and 2 threads: ours vs ``aten._weight_int4pack_mm_for_cpu`` (torch's int4 CPU kernel, what
torchao's int4 CPU layout calls; its weight built as bench/inference.py's Int4Linear does) and
vs the bf16 matmul on the full-precision weight, timed interleaved; ``copy_frac`` is the weight's
bytes (codes, scales, zeros) per second over the measured copy bandwidth, with the weight read
from memory: M = 1 is timed again alone over copies of the weight that together exceed the
caches (``memory_ms``; in the interleaved timing one weight of 8-23 MB may sit in the last-level
cache, or be evicted by the bf16 matmul's buffers). Results are kept per CPU (model and SIMD
features) in bench/results/w4a16.json.
GPU (where present): fp16 and bf16, M in {1 .. 256} on (N, K) in {(8192, 8192), (28672, 8192),
(8192, 28672)}; ``hbm_frac`` is the bytes the kernel must read (codes, scales, zeros, x) per
second of kernel time (the profiler's, without the launch) over the device's measured copy
bandwidth; ``*_us`` is the synchronized wall time of a call, ``*_kernel_us`` the device time; vs
cuBLAS (the fp16 / bf16 matmul on the full weight) and, in bf16, torch's int4 CUDA kernel.
Fidelity: TinyTransformer (tests/test_shiftquant.py) trained in float32, then quantized to W4 g128
by SmoothQuant+ (alpha searched) and by plain round to nearest; loss on held-out batches.
"""

from __future__ import annotations

import copy
import itertools
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from harness import (
    Bench,
    device_copy_bandwidth,
    gpu_kernel_time,
    gpu_section,
    gpu_time,
    interleaved_times,
)
from inference import GROUP, Int4Linear, int4_quantize

import ferrograd as fg
from ferrograd.ops._memory import last_level_cache_bytes

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

CPU_SHAPES = [(4096, 4096), (2048, 2048), (11008, 4096)]
GPU_SHAPES = [(8192, 8192), (28672, 8192), (8192, 28672)]
GPU_ROWS = [1, 4, 8, 16, 32, 128, 256]


CPU_ROWS = [1, 8, 32, 128]
#: Bytes of weight copies the from-memory GEMV cycles through: twice this CPU's last-level
#: cache, at least 96 MiB (a Zen core complex has 32 MiB; the Xeon of family 6 model 207
#: reports 260 MiB, where 96 MiB of copies were read from that cache, not from memory).
BEYOND_CACHE = max(96 << 20, 2 * last_level_cache_bytes())


def cpu_matmul(bench: Bench, n: int, k: int) -> None:
    w = torch.randn(n, k) / k**0.5
    q = fg.quant.quantize_w4(w, GROUP)
    linear = torch.nn.Linear(k, n, bias=False)
    linear.weight.data = w
    int4, w16 = Int4Linear(linear), w.bfloat16()
    weight_bytes = q.packed.numel() + q.scales.numel() * q.scales.element_size() + n * k // GROUP
    for m in CPU_ROWS:
        x = torch.randn(m, k).bfloat16()
        t = interleaved_times(
            {
                "ours": lambda x=x: fg.w4a16_matmul(x, q),
                "int4": lambda x=x: int4(x),
                "bf16": lambda x=x: x @ w16.T,
            },
            repeats=21 if m < 32 else 9,
            warmup=3,
        )
        row = {
            "case": f"bf16 M={m} N={n} K={k}",
            "threads": bench.threads,
            "ours_ms": t["ours"] * 1e3,
            "int4_ms": t["int4"] * 1e3,
            "bf16_ms": t["bf16"] * 1e3,
            "vs_int4": t["int4"] / t["ours"],
            "vs_bf16": t["bf16"] / t["ours"],
        }
        if m == 1:
            from_memory = gemv_from_memory(q, x, weight_bytes)
            row["memory_ms"] = from_memory * 1e3
            row["copy_frac"] = weight_bytes / from_memory / bench.bandwidth
        bench.add(row)


def gemv_from_memory(q, x: torch.Tensor, weight_bytes: int) -> float:
    """Median time of ``w4a16_matmul(x, W)`` over copies of ``q`` taken in turn, which
    together exceed the caches: each call reads its weight from memory."""
    copies = [q, *(copy.deepcopy(q) for _ in range(-(-BEYOND_CACHE // weight_bytes) - 1))]
    turn = itertools.count()
    t = interleaved_times(
        {"gemv": lambda: fg.w4a16_matmul(x, copies[next(turn) % len(copies)])},
        repeats=4 * len(copies) + 1,
        warmup=len(copies),
    )
    return t["gemv"]


def quantize_speed(bench: Bench, n: int = 4096, k: int = 11008) -> None:
    w = torch.randn(n, k)
    t = interleaved_times({"quantize": lambda: fg.quant.quantize_w4(w, 128)}, repeats=5)
    bench.add(
        {
            "case": f"quantize_w4 {n}x{k} g128",
            "ours_ms": t["quantize"] * 1e3,
            "input_GBps": n * k * 4 / t["quantize"] / 1e9,
        }
    )


def heldout_loss(model: torch.nn.Module, batches: list[torch.Tensor]) -> float:
    with torch.no_grad():
        losses = [
            F.cross_entropy(model(ids[:, :-1]).reshape(-1, 16), ids[:, 1:].reshape(-1))
            for ids in batches
        ]
    return float(torch.stack(losses).mean())


def fidelity(bench: Bench) -> None:
    from support.tiny_transformer import fit_tiny, motif_batch

    model, _ = fit_tiny(None, 300)
    g = torch.Generator().manual_seed(7)
    calibration = [motif_batch(g)[:, :-1] for _ in range(8)]
    heldout = [motif_batch(g) for _ in range(16)]
    base = heldout_loss(model, heldout)

    rtn = copy.deepcopy(model)
    for name, module in list(rtn.named_modules()):
        if isinstance(module, torch.nn.Linear):
            parent, _, child = name.rpartition(".")
            owner = rtn.get_submodule(parent) if parent else rtn
            setattr(owner, child, fg.nn.W4A16Linear.from_linear(module, group_size=128))
    smooth = copy.deepcopy(model)
    report = fg.quant.smoothquant_plus(smooth, calibration, group_size=128)
    for method, m in (("round-to-nearest", rtn), ("smoothquant+", smooth)):
        loss = heldout_loss(m, heldout)
        bench.add(
            {
                "case": f"tiny transformer W4 g128 {method}",
                "loss": loss,
                "float32_loss": base,
                "rel_increase": (loss - base) / base,
                "alpha": report.alpha if m is smooth else float("nan"),
            }
        )


def cuda_int4(w: torch.Tensor):
    """torch's int4 CUDA kernel (``aten._weight_int4pack_mm``, tinygemm: what torchao's int4
    CUDA layout calls) on ``w`` quantized as bench/inference.py's ``int4_quantize``, bf16 only:
    returns the matmul as a function of x and the packed weight, or the reason it cannot run
    here and None."""
    codes, scales_and_zeros = int4_quantize(w)
    try:
        packed = torch.ops.aten._convert_weight_to_int4pack(
            (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8), 8
        )
    except (RuntimeError, AttributeError) as e:
        return str(e).splitlines()[0], None
    return (lambda x, p: torch.ops.aten._weight_int4pack_mm(x, p, GROUP, scales_and_zeros)), packed


def gpu(bench: Bench) -> None:
    copy_bw = device_copy_bandwidth()
    for dtype in (torch.float16, torch.bfloat16):
        for n, k in GPU_SHAPES:
            w = (torch.randn(n, k, device="cuda") / k**0.5).to(dtype)
            q = fg.quant.quantize_w4(w, 128)
            int4, packed = cuda_int4(w) if dtype == torch.bfloat16 else (None, None)
            for m in GPU_ROWS:
                x = torch.randn(m, k, device="cuda", dtype=dtype)
                ours = partial(fg.w4a16_matmul, x, q)
                ref = partial(torch.matmul, x, w.T)
                moved = n * k / 2 + q.scales.numel() * 3 + m * k * 2
                row = {
                    "case": f"{str(dtype)[6:]} M={m} N={n} K={k}",
                    "ours_us": gpu_time(ours) * 1e6,
                    "cublas_us": gpu_time(ref) * 1e6,
                    "ours_kernel_us": gpu_kernel_time(ours) * 1e6,
                    "cublas_kernel_us": gpu_kernel_time(ref) * 1e6,
                }
                row["speedup"] = row["cublas_us"] / row["ours_us"]
                row["kernel_speedup"] = row["cublas_kernel_us"] / row["ours_kernel_us"]
                row["hbm_frac"] = moved / (row["ours_kernel_us"] * 1e-6) / copy_bw
                if packed is not None:
                    theirs = partial(int4, x, packed)
                    row["int4_us"] = gpu_time(theirs) * 1e6
                    row["int4_kernel_us"] = gpu_kernel_time(theirs) * 1e6
                    row["vs_int4_kernel"] = row["int4_kernel_us"] / row["ours_kernel_us"]
                elif isinstance(int4, str):
                    row["int4"] = int4
                bench.add(row)
            if packed is not None:  # the int4 reference's own error, so a wrong layout shows
                x = torch.randn(16, k, device="cuda", dtype=dtype)
                exact = x.float() @ w.float().T
                for name, y in (("ours", fg.w4a16_matmul(x, q)), ("int4", int4(x, packed))):
                    err = (y.float() - exact).norm() / exact.norm()
                    bench.add({"case": f"rel err M=16 N={n} K={k} {name}", "rel_err": err.item()})


def main(threads: int | None = None) -> None:
    """1 and 2 threads, or only ``threads``."""
    counts = (threads,) if threads else (1, 2)
    benches = []
    for t in counts:
        bench = Bench("w4a16", t)
        for n, k in CPU_SHAPES:
            cpu_matmul(bench, n, k)
        benches.append(bench)
    quantize_speed(benches[-1])
    fidelity(benches[-1])
    rows = [row for b in benches for row in b.rows]
    benches[-1].save(gpu_section("w4a16", counts[-1], gpu), rows=rows)


if __name__ == "__main__":
    main(int(sys.argv[1]) if sys.argv[1:] else None)
