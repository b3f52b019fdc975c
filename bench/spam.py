"""Optimizer step on CPU: fg.optim.SPAM (dense and density 0.25) and fg.optim.StableSPAM against
torch.optim.AdamW(fused=True), and pytorch-optimizer's SPAM / StableSPAM where that package is
installed (an optional import: ``pip install pytorch-optimizer``; never a dependency).

Each optimizer steps its own copy of the same parameter (one [n / 1000, 1000] tensor) and
gradient; all are timed in turn every round (median), on the same thread count. ``GBps`` counts
the bytes a dense step must move per parameter: 28 for float32 (read p, g, m, v; write p, m, v),
22 for bfloat16 parameters and gradients with float32 moments (torch's AdamW keeps bfloat16
moments: 14); ``bw_frac`` is that rate over the measured copy bandwidth (one read and one write
per element, torch's copy_). SPAM's spike clipping starts after two steps (clip_warmup=2, within
the three untimed warm-up steps), so the timed steps clip against real second moments, as a run
does after its clip warm-up. (With clip_warmup=0 the first step's cap sqrt(threshold * v) is 0 for
v = 0: every gradient entry is clipped to 0, the moments stay 0 and every block takes the rare
spike path; the figures of 2026-12-03 and earlier timed that state.) Results are kept per CPU
model in bench/results/spam.json.
"""

from __future__ import annotations

import gc
import sys

import torch
from harness import Bench, interleaved_times, machine, save_run

import ferrograd as fg

try:  # the strongest plain-torch SPAM / Stable-SPAM a user could install instead
    import pytorch_optimizer
except ImportError:
    pytorch_optimizer = None

#: Bytes a dense step moves per parameter, by parameter dtype.
STEP_BYTES = {torch.float32: 28, torch.bfloat16: 22}


def state_bytes(opt: torch.optim.Optimizer, p: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in opt.state[p].values() if torch.is_tensor(t))


#: Steps before SPAM clips spikes: fewer than the warm-up steps of ``make`` below.
CLIP_WARMUP = 2


def case(bench: Bench, numel: int, dtype: torch.dtype) -> None:
    shape = (numel // 1000, 1000)
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(shape, generator=gen).to(dtype)
    grad = (torch.randn(shape, generator=gen) * 1e-2).to(dtype)
    params = {}

    def make(name, factory, warmup=3):
        p = torch.nn.Parameter(base.clone())
        p.grad = grad.clone()
        params[name] = p
        opt = factory([p])
        for _ in range(warmup):  # state allocated, first-step paths done
            opt.step()
        return opt

    opts = {
        "adamw_fused": make("adamw_fused", lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True)),
        "spam": make("spam", lambda ps: fg.optim.SPAM(ps, lr=1e-3, clip_warmup=CLIP_WARMUP)),
        "spam_sparse": make(
            "spam_sparse",
            lambda ps: fg.optim.SPAM(ps, lr=1e-3, density=0.25, clip_warmup=CLIP_WARMUP),
        ),
        "stable": make("stable", lambda ps: fg.optim.StableSPAM(ps, lr=1e-3)),
    }
    if pytorch_optimizer is not None and dtype == torch.float32:
        # Their steps take seconds at 1e8 (SPAM over half a minute): fewer warm-up steps, and
        # their SPAM only up to 1e7.
        if numel <= 10**7:
            opts["po_spam"] = make("po_spam", lambda ps: pytorch_optimizer.SPAM(ps, lr=1e-3), 2)
        opts["po_stable"] = make(
            "po_stable", lambda ps: pytorch_optimizer.StableSPAM(ps, lr=1e-3), 2
        )
    repeats = 41 if numel <= 10**6 else 15 if numel <= 10**7 else 5
    t = interleaved_times({k: o.step for k, o in opts.items()}, repeats=repeats)
    gbps = STEP_BYTES[dtype] * numel / t["spam"] / 1e9
    row = {
        "params": f"1e{len(str(numel)) - 1}",
        "dtype": str(dtype).removeprefix("torch."),
        "adamw_fused_ms": t["adamw_fused"] * 1e3,
        "spam_ms": t["spam"] * 1e3,
        "sparse_ms": t["spam_sparse"] * 1e3,
        "stable_ms": t["stable"] * 1e3,
        "vs_fused": t["adamw_fused"] / t["spam"],
        "sparse_vs_dense": t["spam"] / t["spam_sparse"],
        "sparse_vs_fused": t["adamw_fused"] / t["spam_sparse"],
        "stable_vs_fused": t["adamw_fused"] / t["stable"],
        "sparse_state_B": state_bytes(opts["spam_sparse"], params["spam_sparse"]) / numel,
        "GBps": gbps,
        "bw_frac": gbps * 1e9 / bench.bandwidth,
    }
    if "po_spam" in t:
        row |= {"po_spam_ms": t["po_spam"] * 1e3, "vs_po_spam": t["po_spam"] / t["spam"]}
    if "po_stable" in t:
        row |= {"po_stable_ms": t["po_stable"] * 1e3, "stable_vs_po": t["po_stable"] / t["stable"]}
    bench.add(row)
    opts.clear()  # frees this size's tensors before the next
    params.clear()
    gc.collect()


def save(bench: Bench, notes: dict) -> None:
    """This machine's results into bench/results/spam.json, beside other CPUs'."""
    info = machine(bench.threads)
    if pytorch_optimizer is not None:
        from importlib.metadata import version

        info["pytorch_optimizer"] = version("pytorch-optimizer")
    run = {"machine": info, "copy_bandwidth_GBps": round(bench.bandwidth / 1e9, 2),
           "notes": notes, "rows": bench.rows}  # fmt: skip
    save_run("spam", run)


def main(threads: int | None = None, sizes=(10**6, 10**7, 10**8)) -> None:
    bench = Bench("spam", threads)
    for dtype in (torch.float32, torch.bfloat16):
        for numel in sizes:
            case(bench, numel, dtype)
    save(
        bench,
        {
            "vs_fused": "torch.optim.AdamW(fused=True) step time / SPAM (dense) step time",
            "sparse_vs_dense": "dense SPAM step time / density-0.25 SPAM step time",
            "stable_vs_fused": "AdamW(fused=True) step time / StableSPAM step time",
            "stable_vs_po": "pytorch-optimizer StableSPAM step time / StableSPAM step time",
            "vs_po_spam": "pytorch-optimizer SPAM step time / SPAM step time",
            "sparse_state_B": "state bytes per parameter at density 0.25 (bound 2.125)",
            "GBps": "bytes a dense step moves per parameter (28 float32, 22 bfloat16) / SPAM time",
            "bw_frac": "GBps over the copy bandwidth",
            "params": "parameters in one [n / 1000, 1000] tensor; bfloat16 rows: bfloat16 "
            "params and grads (ferrograd keeps float32 moments, AdamW bfloat16 ones)",
        },
    )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else None)
