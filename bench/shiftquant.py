"""ShiftQuant on CPU vs torch float32: integer GEMM, ShiftQuantLinear, quantize, L1LayerNorm,
and the training fidelity of a small Transformer at 8 / 6 / 4 bits.

``int8_peak_frac`` divides the integer GEMM's multiply-adds per second by this CPU's int8 peak,
taken as threads x 2 VNNI ports x 64 multiply-adds per cycle x the clock /proc/cpuinfo reports
(an assumption stated in the JSON: a VM does not expose its turbo clock or port count).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from harness import Bench, interleaved_times

import ferrograd as fg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def cpu_mhz() -> float:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("cpu MHz"):
            return float(line.split(":")[1])
    return float("nan")


def train_step(layer: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor):
    """One forward + backward of ``layer`` on a fresh leaf copy of ``x``."""

    def run():
        xi = x.clone().requires_grad_()
        layer(xi).backward(grad)
        layer.zero_grad(set_to_none=True)

    return run


def compare_layers(bench: Bench, case: str, ours, ref, x, grad, repeats: int) -> None:
    """One row: forward + backward of our layer against torch's, interleaved."""
    t = interleaved_times(
        {"ours": train_step(ours, x, grad), "torch": train_step(ref, x, grad)}, repeats=repeats
    )
    bench.add(
        {
            "case": case,
            "ours_ms": t["ours"] * 1e3,
            "torch_ms": t["torch"] * 1e3,
            "speedup": t["torch"] / t["ours"],
        }
    )


def gemm(bench: Bench, m: int, k: int, n: int, peak: float) -> None:
    a, b = torch.randn(m, k), torch.randn(n, k)
    qa, qb = fg.shiftquant(a), fg.shiftquant(b)
    t = interleaved_times(
        {
            "int": lambda: fg.shiftquant_matmul(qa, qb),
            "int+quant": lambda: fg.shiftquant_matmul(fg.shiftquant(a), fg.shiftquant(b)),
            "torch": lambda: torch.matmul(a, b.T),
        },
        repeats=5 if m * n * k <= 2**33 else 3,
    )
    macs = m * n * k / t["int"]
    bench.add(
        {
            "case": f"gemm {m}x{k}x{n}",
            "ours_ms": t["int"] * 1e3,
            "torch_ms": t["torch"] * 1e3,
            "speedup": t["torch"] / t["int"],
            "speedup_with_quant": t["torch"] / t["int+quant"],
            "GMACs": macs / 1e9,
            "int8_peak_frac": macs / peak,
        }
    )


def linear(bench: Bench, tokens: int, k: int, n: int) -> None:
    torch.manual_seed(0)
    ref = torch.nn.Linear(k, n)
    ours = fg.nn.ShiftQuantLinear.from_linear(ref, bits=8)
    x, grad = torch.randn(tokens, k), torch.randn(tokens, n)
    compare_layers(bench, f"linear fwd+bwd {tokens}x{k}->{n}", ours, ref, x, grad, repeats=5)


def quantize(bench: Bench, rows: int, cols: int) -> None:
    x = torch.randn(rows, cols)
    t = interleaved_times({"rows": lambda: fg.shiftquant(x), "copy": lambda: x.clone()}, repeats=9)
    moved = rows * cols * 5  # read float32, write int8 (scales and shifts are <2% more)
    gbps = moved / t["rows"]
    bench.add(
        {
            "case": f"quantize {rows}x{cols}",
            "ours_ms": t["rows"] * 1e3,
            "torch_ms": t["copy"] * 1e3,
            "GBps": gbps / 1e9,
            "copy_bw_frac": gbps / bench.bandwidth,
        }
    )


def l1norm(bench: Bench, rows: int, cols: int) -> None:
    x = torch.randn(rows, cols)
    grad = torch.randn(rows, cols)
    ours, ref = fg.nn.L1LayerNorm(cols), torch.nn.LayerNorm(cols)
    compare_layers(bench, f"norm fwd+bwd {rows}x{cols}", ours, ref, x, grad, repeats=9)


def fidelity(bench: Bench, steps: int) -> None:
    from test_shiftquant import train_tiny

    base = train_tiny(None, steps)
    for bits in (8, 6, 4):
        loss = train_tiny(bits, steps)
        bench.add(
            {
                "case": f"tiny transformer {steps} steps, {bits} bits",
                "loss": loss,
                "float32_loss": base,
                "rel_diff": (loss - base) / base,
            }
        )


def main(threads: int | None = None) -> None:
    bench = Bench("shiftquant", threads)
    mhz = cpu_mhz()
    peak = bench.threads * 2 * 64 * mhz * 1e6
    for size in (512, 1024, 2048, 4096):
        gemm(bench, size, size, size, peak)
    gemm(bench, 4096, 1024, 4096, peak)
    gemm(bench, 4096, 4096, 1024, peak)
    linear(bench, 4096, 1024, 4096)
    quantize(bench, 4096, 4096)
    l1norm(bench, 8192, 1024)
    fidelity(bench, 300)
    bench.save(
        {
            "speedup": "torch float32 time / ferrograd time (same threads)",
            "speedup_with_quant": "as speedup, with both operands quantized inside the timing",
            "int8_peak": f"{peak / 1e9:.0f} GMAC/s assumed: threads x 2 ports x 64 x {mhz} MHz",
            "GBps": "quantize: bytes read (float32) + written (int8) per second",
            "rel_diff": "(final loss at b bits - float32 final loss) / float32 final loss, "
            "mean of the last 20 of 300 AdamW steps on a repeated-motif task",
        }
    )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else None)
