"""ShiftQuant on CPU vs torch: the integer GEMM against torch's float32 and bf16 matmuls and
torch._int_mm (int8 x int8 -> int32, no scales), ShiftQuantLinear against nn.Linear in float32
and under bf16 autocast, quantize, L1LayerNorm, and the training fidelity of a small Transformer
at 8 / 6 / 4 bits. On a GPU (shiftquant_gpu.json):
ShiftQuantLinear forward + backward vs nn.Linear in bf16 at 8192 tokens, the integer GEMM alone
vs the bf16 matmul, the quantize kernels as a fraction of the device's copy bandwidth, and the
training tokens per second of a small byte-level LM (the demo's) against its bf16 twin.

``int8_peak_frac`` divides the integer GEMM's multiply-adds per second by this CPU's int8 peak:
threads x the clock x the multiply-adds per cycle of the kernel's instructions. With AVX-512 VNNI
that is 64 per 512-bit `vpdpbusd`, two per cycle (one on AMD Zen 4, which splits each into two
256-bit halves). With AVX2, 8-bit codes need a vpmaddubsw + vpmaddwd pair
per 32 products (16 per port and cycle) and narrower codes about one vpmaddubsw (32); AMD Zen 1/2
(family 23) multiply on one vector port, other CPUs on two. The clock is measured (a chain of
dependent adds, one per cycle; a VM's /proc/cpuinfo reports its base clock); the port count is an
assumption stated in each row.

Results are kept per CPU (bench/results/shiftquant.json maps a CPU key to its run), so that a run
on one machine does not overwrite another's.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
from harness import (
    Bench,
    cpu_has_bf16,
    device_copy_bandwidth,
    gpu_kernel_time,
    gpu_section,
    gpu_time,
    interleaved_times,
)

import ferrograd as fg
from ferrograd import _core
from ferrograd.ops.shiftquant import matmul_2d, quantize_2d

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


#: Whether torch's bf16 matmul and torch._int_mm are measured: on CPUs without BF16 and VNNI
#: instructions (AVX2 only) they are emulated (Zen 3: bf16 8x slower than float32, _int_mm 20x,
#: a bf16-autocast nn.Linear step at 4096 x 1024 -> 4096 a minute), so float32 is the baseline.
CPU = fg.cpu_info()
FEATURES = CPU["features"]
# bf16 where the CPU multiplies it natively (a run as another CPU turns avx512bf16 off,
# docs/ops.md); torch._int_mm where oneDNN has VNNI kernels for it, 512- or 256-bit (without,
# it runs a reference loop).
BF16_BASELINE = cpu_has_bf16() and "avx512bf16" not in CPU["disabled"]
INT_MM_BASELINE = FEATURES["avx512vnni"] or FEATURES["avxvnni"]


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


def int8_peak(threads: int, bits: int) -> tuple[float, str]:
    """This CPU's assumed peak int8 multiply-adds per second for codes of ``bits``, and how."""
    info = Path("/proc/cpuinfo").read_text()
    level = _core.simd_level()  # FERROGRAD_SIMD may force a narrower path than the CPU's
    if level == "avx512" and FEATURES["avx512vnni"]:
        # Zen 4 (family 25) runs a 512-bit vpdpbusd as two halves on its two 256-bit pipes.
        per_port, ports = 64, 1 if "AuthenticAMD" in info and "cpu family\t: 25\n" in info else 2
    elif level != "scalar" and FEATURES["avxvnni"]:
        per_port, ports = 32, 2  # 256-bit vpdpbusd, two a cycle
    else:
        per_port = 16 if bits == 8 else 32
        ports = 1 if "AuthenticAMD" in info and "cpu family\t: 23\n" in info else 2
    # measured_clock_hz exists in `dev` builds only (make develop).
    measured = getattr(_core, "measured_clock_hz", lambda: None)()
    mhz = measured / 1e6 if measured else cpu_mhz()
    clock = "measured" if measured else "/proc/cpuinfo"
    how = f"{threads} threads x {ports} ports x {per_port} MAC/cycle x {mhz:.0f} MHz ({clock})"
    return threads * ports * per_port * mhz * 1e6, how


def gemm(bench: Bench, m: int, k: int, n: int, bits: int = 8) -> None:
    a, b = torch.randn(m, k), torch.randn(n, k)
    qa, qb = fg.shiftquant(a, bits), fg.shiftquant(b, bits)
    peak, how = int8_peak(bench.threads, bits)

    def quant(x: torch.Tensor):
        return fg.shiftquant(x, bits)

    fns = {
        "int": lambda: fg.shiftquant_matmul(qa, qb),
        "int+quant": lambda: fg.shiftquant_matmul(quant(a), quant(b)),
        "torch": lambda: torch.matmul(a, b.T),
    }
    if BF16_BASELINE:
        a16, b16 = a.bfloat16(), b.bfloat16()
        fns["bf16"] = lambda: torch.matmul(a16, b16.T)
    if INT_MM_BASELINE:
        a8 = torch.randint(-127, 128, (m, k), dtype=torch.int8)
        b8 = torch.randint(-127, 128, (n, k), dtype=torch.int8).T
        fns["int_mm"] = lambda: torch._int_mm(a8, b8)
    # Three warm-up calls each: the first several calls of a new shape ran up to 1.7x slower
    # than the steady state a training loop sees (Zen 4, 1024^3: 5.4, 3.9, 3.3, ... then
    # 3.1-3.3 ms), which one warm-up call left in the medians.
    t = interleaved_times(fns, repeats=5 if m * n * k <= 2**33 else 3, warmup=3)
    macs = m * n * k / t["int"]
    row = {
        "case": f"gemm {m}x{k}x{n}" + ("" if bits == 8 else f" at {bits} bits"),
        "ours_ms": t["int"] * 1e3,
        "torch_ms": t["torch"] * 1e3,
        "speedup": t["torch"] / t["int"],
        "speedup_with_quant": t["torch"] / t["int+quant"],
        "GMACs": macs / 1e9,
        "int8_peak_frac": macs / peak,
        "int8_peak": how,
    }
    if BF16_BASELINE:
        row |= {"bf16_ms": t["bf16"] * 1e3, "vs_bf16": t["bf16"] / t["int"]}
    if INT_MM_BASELINE:
        row |= {
            "int_mm_ms": t["int_mm"] * 1e3,
            "vs_int_mm": t["int_mm"] / t["int"],
            "int_mm_peak_frac": m * n * k / t["int_mm"] / peak,
        }
    bench.add(row)


def autocast_step(layer: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor):
    """``train_step`` under CPU bf16 autocast (nn.Linear then runs its three GEMMs in bf16). The
    output gradient arrives in bf16, as the layer's bf16 output gets it inside a model (a
    float32 one cost both layers a 64 MB conversion per step at 4096 x 4096)."""
    step = train_step(layer, x, grad.bfloat16())

    def run():
        with torch.autocast("cpu", torch.bfloat16):
            step()

    return run


def linear(bench: Bench, tokens: int, k: int, n: int, bits: int = 8) -> None:
    torch.manual_seed(0)
    ref = torch.nn.Linear(k, n)
    ours = fg.nn.ShiftQuantLinear.from_linear(ref, bits=bits)
    x, grad = torch.randn(tokens, k), torch.randn(tokens, n)
    case = f"linear fwd+bwd {tokens}x{k}->{n}" + ("" if bits == 8 else f" at {bits} bits")
    fns = {"ours": train_step(ours, x, grad), "torch": train_step(ref, x, grad)}
    if BF16_BASELINE:
        fns |= {"ours_autocast": autocast_step(ours, x, grad), "bf16": autocast_step(ref, x, grad)}
    t = interleaved_times(fns, repeats=5 if tokens * k * n > 2**32 else 15)
    row = {
        "case": case,
        "ours_ms": t["ours"] * 1e3,
        "torch_ms": t["torch"] * 1e3,
        "speedup": t["torch"] / t["ours"],
    }
    if BF16_BASELINE:
        row |= {
            "ours_autocast_ms": t["ours_autocast"] * 1e3,
            "bf16_ms": t["bf16"] * 1e3,
            "vs_bf16": t["bf16"] / t["ours"],
            "autocast_vs_bf16": t["bf16"] / t["ours_autocast"],
        }
    bench.add(row)


def linear_eval(bench: Bench, tokens: int, k: int, n: int) -> None:
    """Forward only, without gradients (evaluation, generation): ShiftQuantLinear as it comes
    (its weight's codes kept between such calls: quantized and packed once, not per call) and
    with ``cache_weight_codes=False`` (quantized per call, the "ours" columns) against
    nn.Linear in float32 and with bf16 weights, the strongest a user evaluating on a BF16 CPU
    has (no per-call cast); x in bf16 for the bf16 rows."""
    torch.manual_seed(0)
    ref = torch.nn.Linear(k, n)
    plain = fg.nn.ShiftQuantLinear.from_linear(ref, cache_weight_codes=False)
    cached = fg.nn.ShiftQuantLinear.from_linear(ref)
    x = torch.randn(tokens, k)
    fns = {"ours": lambda: plain(x), "cached": lambda: cached(x), "torch": lambda: ref(x)}
    if BF16_BASELINE:
        ref16, x16 = copy.deepcopy(ref).bfloat16(), x.bfloat16()
        fns["bf16"] = lambda: ref16(x16)
        fns["cached_bf16"] = lambda: cached(x16)
    with torch.no_grad():
        t = interleaved_times(fns, repeats=25 if tokens < 64 else 9)
    row = {
        "case": f"linear eval {tokens}x{k}->{n}",
        "ours_ms": t["ours"] * 1e3,
        "cached_ms": t["cached"] * 1e3,
        "torch_ms": t["torch"] * 1e3,
        "speedup": t["torch"] / t["cached"],
        "cache_speedup": t["ours"] / t["cached"],
    }
    if BF16_BASELINE:
        row |= {
            "bf16_ms": t["bf16"] * 1e3,
            "cached_bf16_ms": t["cached_bf16"] * 1e3,
            "vs_bf16": t["bf16"] / t["cached_bf16"],
        }
    bench.add(row)


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
    from support.tiny_transformer import train_tiny

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


def gpu_linear(bench: Bench, tokens: int, k: int, n: int) -> None:
    torch.manual_seed(0)
    ref = torch.nn.Linear(k, n, device="cuda", dtype=torch.bfloat16)
    ours = fg.nn.ShiftQuantLinear.from_linear(ref, bits=8)
    x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16)
    grad = torch.randn(tokens, n, device="cuda", dtype=torch.bfloat16)
    t_ours, t_ref = (gpu_time(train_step(layer, x, grad)) for layer in (ours, ref))
    k_ours, k_ref = (gpu_kernel_time(train_step(layer, x, grad)) for layer in (ours, ref))
    bench.add(
        {
            "case": f"gpu linear fwd+bwd bf16 {tokens}x{k}->{n}",
            "ours_ms": t_ours * 1e3,
            "torch_ms": t_ref * 1e3,
            "speedup": t_ref / t_ours,
            "ours_kernel_ms": k_ours * 1e3,
            "torch_kernel_ms": k_ref * 1e3,
        }
    )
    qx, qw = fg.shiftquant(x), fg.shiftquant(ref.weight)
    t_int = gpu_time(lambda: matmul_2d(qx, qw, None, torch.bfloat16))
    t_mm = gpu_time(lambda: x @ ref.weight.T)
    bench.add(
        {
            "case": f"gpu gemm {tokens}x{k}x{n} (int8 codes -> bf16 vs bf16 matmul)",
            "ours_ms": t_int * 1e3,
            "torch_ms": t_mm * 1e3,
            "speedup": t_mm / t_int,
            "TOPS": 2 * tokens * k * n / t_int / 1e12,
        }
    )


def gpu_quantize(bench: Bench, rows: int, cols: int, copy_bw: float) -> None:
    x = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)
    moved = x.numel() * 3  # read bf16, write int8 (scales and shifts are <2% more)
    for transposed, seed in ((False, None), (False, 7), (True, 7)):
        t = gpu_time(lambda: quantize_2d(x, 8, 64, seed, transposed))  # noqa: B023
        bench.add(
            {
                "case": f"gpu quantize bf16 {rows}x{cols} "
                + ("transposed " if transposed else "")
                + ("stochastic" if seed is not None else "nearest"),
                "ours_ms": t * 1e3,
                "GBps": moved / t / 1e9,
                "copy_bw_frac": moved / t / copy_bw,
            }
        )


def gpu_lm(bench: Bench, steps: int = 20) -> None:
    """Training tokens per second of the demo's byte LM (dim 1024, 4 layers, 8 x 1024 tokens):
    ShiftQuantLinear (8 bits) + L1LayerNorm against the nn.Linear / LayerNorm model in bf16
    autocast, both with the same loss (materialized logits) and AdamW."""
    from ferrograd import demo

    cfg = demo.Config(data=[], device="cuda", dim=1024, layers=4, heads=8, seq_len=1024)
    ids = torch.randint(4, 260, (8, cfg.seq_len), device="cuda")
    batch = {
        "ids": ids,
        "targets": ids.roll(-1, 1),
        "positions": torch.arange(cfg.seq_len, device="cuda").expand(8, -1),
        "documents": torch.zeros_like(ids),
    }
    rates = {}
    for name, ferrograd in (("ours", True), ("bf16", False)):
        model, _ = demo.build(cfg, ferrograd)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(model=model, opt=opt):
            with torch.autocast("cuda", torch.bfloat16, enabled=not ferrograd):  # noqa: B023
                logits = model(batch["ids"], batch["positions"], batch["documents"])
                loss = torch.nn.functional.cross_entropy(
                    logits.reshape(-1, demo.VOCAB).float(), batch["targets"].reshape(-1)
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        rates[name] = ids.numel() / gpu_time(step, repeats=steps)
    bench.add(
        {
            "case": "gpu byte LM training (dim 1024, 4 layers, 8x1024 tokens)",
            "ours_tokens_per_s": rates["ours"],
            "bf16_tokens_per_s": rates["bf16"],
            "speedup": rates["ours"] / rates["bf16"],
        }
    )


def gpu(bench: Bench) -> None:
    copy_bw = device_copy_bandwidth()
    for k, n in ((4096, 4096), (4096, 14336)):
        gpu_linear(bench, 8192, k, n)
    gpu_quantize(bench, 8192, 4096, copy_bw)
    gpu_lm(bench)


def main(threads: int | None = None) -> None:
    bench = Bench("shiftquant", threads)
    for size in (512, 1024, 2048, 4096):
        gemm(bench, size, size, size)
    gemm(bench, 4096, 1024, 4096)
    gemm(bench, 4096, 4096, 1024)
    for bits in (6, 4):
        gemm(bench, 2048, 2048, 2048, bits)
    linear(bench, 4096, 1024, 4096)
    linear(bench, 4096, 1024, 4096, bits=6)
    # The demo model's shapes (dim 512, MLP 1376) at 1024 tokens.
    for k, n in ((512, 512), (512, 1376), (1376, 512)):
        linear(bench, 1024, k, n)
    for tokens in (1, 8, 32):
        linear_eval(bench, tokens, 4096, 4096)
    linear_eval(bench, 8, 512, 1376)
    linear_eval(bench, 1024, 512, 1376)
    quantize(bench, 4096, 4096)
    l1norm(bench, 8192, 1024)
    fidelity(bench, 300)
    notes = gpu_section("shiftquant", threads, gpu)
    bench.save(
        {
            **notes,
            "speedup": "torch float32 time / ferrograd time (same threads)",
            "baselines": "bf16 rows only on CPUs with BF16 instructions, torch._int_mm only on "
            "CPUs with VNNI (512- or 256-bit); elsewhere torch emulates them, 8-20x slower than "
            "float32",
            "vs_bf16": "torch bf16 time / ferrograd time: torch.matmul on bf16 operands (gemm), "
            "nn.Linear forward + backward under torch.autocast('cpu', torch.bfloat16) (linear)",
            "autocast_vs_bf16": "linear: both layers under bf16 autocast (ShiftQuantLinear then "
            "returns bf16 and quantizes the bf16 output gradient as it is), float32 x",
            "vs_int_mm": "torch._int_mm time (int8 x int8 -> int32, no scales) / ferrograd time",
            "speedup_with_quant": "as speedup, with both operands quantized inside the timing",
            "linear_eval": "forward under torch.no_grad: cached = ShiftQuantLinear("
            "cache_weight_codes=True) (weight quantized and packed once), ours = without; "
            "speedup = float32 nn.Linear / cached, vs_bf16 = nn.Linear with bf16 weights on bf16 x "
            "/ cached on the same bf16 x, cache_speedup = ours / cached",
            "int8_peak": "per row: threads x vector ports that multiply (assumed) x int8 MACs "
            "per port and cycle x the measured clock (see the module docstring)",
            "int_mm_peak_frac": "torch._int_mm's multiply-adds per second / the same int8 peak",
            "GBps": "quantize: bytes read (float32) + written (int8) per second",
            "rel_diff": "(final loss at b bits - float32 final loss) / float32 final loss, "
            "mean of the last 20 of 300 AdamW steps on a repeated-motif task",
        }
    )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else None)
