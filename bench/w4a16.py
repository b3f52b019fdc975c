"""W4A16: the 4-bit weight matmul vs torch's matmul on the full-precision weight, the W4
quantizer's throughput, and SmoothQuant+ fidelity on a small trained Transformer.

CPU (float32 x): M in {1, 8} on W [N, K] in {4096 x 4096, 11008 x 4096}, group size 128.
GPU (where present): fp16 and bf16, M in {1 .. 256} on (N, K) in {(8192, 8192), (28672, 8192),
(8192, 28672)}; ``hbm_frac`` is the bytes the kernel must read (codes, scales, zeros, x) per
second over the device's measured copy bandwidth.
Fidelity: TinyTransformer (tests/test_shiftquant.py) trained in float32, then quantized to W4 g128
by SmoothQuant+ (alpha searched) and by plain round to nearest; loss on held-out batches.
"""

from __future__ import annotations

import copy
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from harness import Bench, device_copy_bandwidth, gpu_section, gpu_time, interleaved_times

import ferrograd as fg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

CPU_SHAPES = [(4096, 4096), (11008, 4096)]
GPU_SHAPES = [(8192, 8192), (28672, 8192), (8192, 28672)]
GPU_ROWS = [1, 2, 4, 8, 16, 32, 64, 128, 256]


def cpu_matmul(bench: Bench, n: int, k: int, m: int) -> None:
    w = torch.randn(n, k) / k**0.5
    q = fg.quant.quantize_w4(w, 128)
    x = torch.randn(m, k)
    t = interleaved_times(
        {"ours": lambda: fg.w4a16_matmul(x, q), "torch": lambda: x @ w.T}, repeats=21, warmup=3
    )
    bench.add(
        {
            "case": f"cpu M={m} N={n} K={k}",
            "ours_ms": t["ours"] * 1e3,
            "torch_ms": t["torch"] * 1e3,
            "speedup": t["torch"] / t["ours"],
            "weight_GBps": (n * k / 2 + n * (k // 128) * 3) / t["ours"] / 1e9,
        }
    )


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


def gpu(bench: Bench) -> None:
    copy_bw = device_copy_bandwidth()
    for dtype in (torch.float16, torch.bfloat16):
        for n, k in GPU_SHAPES:
            w = (torch.randn(n, k, device="cuda") / k**0.5).to(dtype)
            q = fg.quant.quantize_w4(w, 128)
            for m in GPU_ROWS:
                x = torch.randn(m, k, device="cuda", dtype=dtype)
                ours = gpu_time(partial(fg.w4a16_matmul, x, q))
                ref = gpu_time(partial(torch.matmul, x, w.T))
                moved = n * k / 2 + q.scales.numel() * 3 + m * k * 2
                bench.add(
                    {
                        "case": f"{str(dtype)[6:]} M={m} N={n} K={k}",
                        "ours_us": ours * 1e6,
                        "cublas_us": ref * 1e6,
                        "speedup": ref / ours,
                        "hbm_frac": moved / ours / copy_bw,
                    }
                )


def main(threads: int | None = None) -> None:
    bench = Bench("w4a16", threads)
    for n, k in CPU_SHAPES:
        for m in (1, 8):
            cpu_matmul(bench, n, k, m)
    quantize_speed(bench)
    fidelity(bench)
    bench.save(gpu_section("w4a16", threads, gpu))


if __name__ == "__main__":
    main()
