"""Cut cross-entropy (fg.linear_cross_entropy) vs the logits path a user writes today,
``F.cross_entropy(e @ c.T, targets)``: time and peak memory of forward + backward.

CPU: float32 at N=4096, D=256, V=131072, bfloat16 inputs at N=2048, D=512 and V = 32000 /
128256 / 256000 against bf16 logits + F.cross_entropy, the baseline this CPU's user has, and the
shape bench/model.py's Llama hands the loss (N=1024, D=512, V=32000) under bf16 autocast: e
bfloat16, c a float32 parameter (cast to bfloat16 by the Linear or by the loss). Where torch's
bf16 matmul is not the faster one (ferrograd.ops._matmul measures it as the loss does: emulated
on AVX2-only CPUs, 8x slower than float32 on Zen 3, where one bf16 baseline step took 105 s;
half the float32 rate on an Intel Xeon of family 6 model 207 without AMX) the baseline upcasts e
and c and computes float32 logits; the autocast case runs where the CPU has BF16 instructions.
Peak memory is measured in a fresh subprocess per method and case (the growth of the resident
set while the loss and its gradients are computed, so the gradients themselves, dC = 128 MiB in
the first case, count against both), after the same method has run once on a tiny problem
(N=64, V=1024): a model's loss runs in a process whose matmul libraries, thread teams and
kernels are loaded, which in a cold process cost 13-21 MiB (``peak_*_cold_MiB`` keep those
figures: the first call's growth without the warm-up).
GPU (bfloat16, where a GPU is present): Gemma 2 2B (N=8192, D=2304, V=256000) and Llama 3
(N=8192, D=4096, V=128256) against torch eager, torch.compile, and Apple's ml-cross-entropy
(``cut_cross_entropy``) and Liger-Kernel where installed; memory is the peak allocated beyond the
inputs and the gradients (what the loss itself costs).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from harness import (
    Bench,
    cpu_has_bf16,
    gpu_kernel_time,
    gpu_section,
    gpu_time,
    interleaved_times,
)

import ferrograd as fg
from ferrograd.ops._matmul import bf16_matmul_is_faster

#: (dtype, N, D, V, autocast); under autocast c is a float32 parameter
CPU_CASES = [
    (torch.float32, 4096, 256, 131072, False),
    (torch.bfloat16, 2048, 512, 32000, False),
    (torch.bfloat16, 2048, 512, 128256, False),
    (torch.bfloat16, 2048, 512, 256000, False),
    (torch.bfloat16, 1024, 512, 32000, True),
]
GPU_SHAPES = {"gemma2-2b": (8192, 2304, 256000), "llama3": (8192, 4096, 128256)}


def inputs(
    n: int, d: int, v: int, device: str = "cpu", dtype=torch.float32, seed: int = 0, c_dtype=None
):
    g = torch.Generator(device=device).manual_seed(seed)
    e = (torch.randn(n, d, generator=g, device=device) * 0.5).to(dtype).requires_grad_()
    c = torch.randn(v, d, generator=g, device=device) / d**0.5
    c = c.to(c_dtype or dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g, device=device)
    return e, c, targets


def torch_loss(e, c, targets):
    if e.is_cpu and not bf16_matmul_is_faster():  # float32 logits: the faster on such a CPU
        e, c = e.float(), c.float()
    return F.cross_entropy((e @ c.T).float(), targets)


def train_step(loss_fn: Callable, e, c, targets, autocast=False) -> Callable[[], None]:
    def run():
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            loss = loss_fn(e, c, targets)
        loss.backward()
        e.grad = c.grad = None

    return run


def forward(loss_fn: Callable, e, c, targets, autocast=False) -> Callable[[], None]:
    def run():
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            loss_fn(e, c, targets)

    return run


def cpu_inputs(case: int):
    dtype, n, d, v, autocast = CPU_CASES[case]
    return inputs(n, d, v, dtype=dtype, c_dtype=torch.float32 if autocast else None), autocast


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def _reset_peak_rss() -> None:
    """Resets VmHWM to the current RSS (getrusage's maxrss would carry the parent's peak across
    fork + exec)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def child_peak(method: str, case: int, warm: bool) -> None:
    """In a fresh process: peak resident growth of one forward + backward, printed as JSON;
    ``warm``: after one of the same method on a tiny problem."""
    torch.set_num_threads(int(sys.argv[3]))
    (e, c, targets), autocast = cpu_inputs(case)
    loss_fn = fg.linear_cross_entropy if method == "ours" else torch_loss
    if warm:
        dtype, _, d, _, _ = CPU_CASES[case]
        tiny = inputs(64, d, 1024, dtype=dtype, c_dtype=torch.float32 if autocast else None)
        train_step(loss_fn, *tiny, autocast)()
    _reset_peak_rss()
    before = _status_bytes("VmRSS")
    train_step(loss_fn, e, c, targets, autocast)()
    print(json.dumps({"extra_bytes": _status_bytes("VmHWM") - before}))


def cpu_peak(method: str, case: int, threads: int, warm: bool = True) -> int:
    cmd = [sys.executable, __file__, "--child", method, str(threads), str(case)]
    cmd += ["warm"] if warm else []
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.splitlines()[-1])["extra_bytes"]


def cpu(bench: Bench) -> None:
    for case, (dtype, n, d, v, autocast) in enumerate(CPU_CASES):
        if autocast and not cpu_has_bf16():
            continue
        (e, c, targets), _ = cpu_inputs(case)
        args = (e, c, targets, autocast)
        fwd = interleaved_times(
            {"ours": forward(fg.linear_cross_entropy, *args), "torch": forward(torch_loss, *args)},
            repeats=3,
        )
        both = interleaved_times(
            {
                "ours": train_step(fg.linear_cross_entropy, *args),
                "torch": train_step(torch_loss, *args),
            },
            repeats=5,
        )
        ours_mem, torch_mem = (cpu_peak(m, case, bench.threads) for m in ("ours", "torch"))
        cold = {m: cpu_peak(m, case, bench.threads, warm=False) for m in ("ours", "torch")}
        bench.add(
            {
                "case": f"cpu {'autocast ' if autocast else ''}"
                f"{str(dtype).removeprefix('torch.')} N={n} D={d} V={v}",
                "fwd_ours_ms": fwd["ours"] * 1e3,
                "fwd_torch_ms": fwd["torch"] * 1e3,
                "fwdbwd_ours_ms": both["ours"] * 1e3,
                "fwdbwd_torch_ms": both["torch"] * 1e3,
                "speedup": both["torch"] / both["ours"],
                "torch_logits": "bfloat16"
                if autocast or (dtype == torch.bfloat16 and bf16_matmul_is_faster())
                else "float32",
                "peak_ours_MiB": ours_mem / 2**20,
                "peak_torch_MiB": torch_mem / 2**20,
                "memory_ratio": ours_mem / torch_mem,
                "peak_ours_cold_MiB": cold["ours"] / 2**20,
                "peak_torch_cold_MiB": cold["torch"] / 2**20,
            }
        )


def gpu_methods() -> dict[str, Callable]:
    methods = {
        "ferrograd": fg.linear_cross_entropy,
        "torch": torch_loss,
        "torch.compile": torch.compile(torch_loss),
    }
    try:
        from cut_cross_entropy import linear_cross_entropy as mlce

        methods["ml-cross-entropy"] = mlce
    except ImportError:
        pass
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        methods["liger"] = lambda e, c, t: liger_fused_linear_cross_entropy(e, c, t)
    except ImportError:
        pass
    return methods


def gpu(bench: Bench) -> None:
    for name, (n, d, v) in GPU_SHAPES.items():
        e, c, targets = inputs(n, d, v, "cuda", torch.bfloat16)
        grads_bytes = (e.numel() + c.numel()) * e.element_size()
        for method, loss_fn in gpu_methods().items():
            try:
                fwd = gpu_time(partial(loss_fn, e.detach(), c.detach(), targets))
                both = gpu_time(train_step(loss_fn, e, c, targets))
                both_kernels = gpu_kernel_time(train_step(loss_fn, e, c, targets), repeats=5)
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                loss_fn(e, c, targets).backward()
                torch.cuda.synchronize()
                extra = torch.cuda.max_memory_allocated() - base - grads_bytes
                e.grad = c.grad = None
            except torch.OutOfMemoryError:
                bench.add({"case": f"{name} {method}", "error": "out of memory"})
                continue
            bench.add(
                {
                    "case": f"{name} {method}",
                    "fwd_ms": fwd * 1e3,
                    "fwdbwd_ms": both * 1e3,
                    "bwd_ms": (both - fwd) * 1e3,
                    "fwdbwd_kernel_ms": both_kernels * 1e3,
                    "loss_memory_MiB": extra / 2**20,
                }
            )


def main(threads: int | None = None) -> None:
    bench = Bench("cce", threads)
    cpu(bench)
    bench.save(gpu_section("cce", threads, gpu))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        child_peak(sys.argv[2], int(sys.argv[4]), warm=sys.argv[5:] == ["warm"])
    else:
        main()
