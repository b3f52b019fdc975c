"""Optimizer step on CPU: fg.optim.SPAM (dense and density 0.25) and fg.optim.StableSPAM against
torch.optim.AdamW(fused=True), and pytorch-optimizer's SPAM / StableSPAM where that package is
installed (an optional import: ``pip install pytorch-optimizer``; never a dependency).

Each optimizer steps its own copy of the same parameters and gradients: one [n / 1000, 1000]
tensor of 1e6-1e8 parameters, and the 38 tensors of bench/model.py's Llama (29M parameters, one
32000 x 512 embedding, 512-1376 wide layers), where per-tensor costs (Python bookkeeping, a
parallel region per call) and caches (StableSPAM's statistics pass leaves a layer's gradient in
cache for the update) come in; all are timed in turn every round (median), on the same thread
count. ``GBps`` counts
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


def state_bytes(opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> int:
    return sum(
        t.numel() * t.element_size()
        for p in params
        for t in opt.state[p].values()
        if torch.is_tensor(t)
    )


#: Steps before SPAM clips spikes: fewer than the warm-up steps of ``make`` below.
CLIP_WARMUP = 2


def llama_shapes(layers: int = 4, width: int = 512, mlp: int = 1376, vocab: int = 32000):
    """The parameter tensors of bench/model.py's Llama (tied embeddings): per layer four
    attention projections, three MLP ones and two norms, then the final norm."""
    layer = [(width, width)] * 4 + [(mlp, width)] * 2 + [(width, mlp)] + [(width,)] * 2
    return [(vocab, width), *layer * layers, (width,)]


def case(bench: Bench, shapes: list[tuple[int, ...]], dtype: torch.dtype, label: str) -> None:
    """All optimizers on their own copies of the same parameters of ``shapes``."""
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(shape, generator=gen).to(dtype) for shape in shapes]
    grads = [(torch.randn(shape, generator=gen) * 1e-2).to(dtype) for shape in shapes]
    numel = sum(b.numel() for b in base)
    params = {}

    def make(name, factory, warmup=3):
        ps = [torch.nn.Parameter(b.clone()) for b in base]
        for p, g in zip(ps, grads, strict=True):
            p.grad = g.clone()
        params[name] = ps
        opt = factory(ps)
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
    repeats = 41 if numel <= 10**6 else 15 if numel <= 10**7 else 9 if numel < 10**8 else 5
    t = interleaved_times({k: o.step for k, o in opts.items()}, repeats=repeats)
    gbps = STEP_BYTES[dtype] * numel / t["spam"] / 1e9
    row = {
        "params": label,
        "tensors": len(shapes),
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
    model = llama_shapes()
    for dtype in (torch.float32, torch.bfloat16):
        for numel in sizes:
            case(bench, [(numel // 1000, 1000)], dtype, f"1e{len(str(numel)) - 1}")
        case(bench, model, dtype, "llama 4x512 32k")
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
            "params": "1eN: parameters in one [n / 1000, 1000] tensor; llama: the tensors of "
            "bench/model.py's 4-layer 512-wide Llama, vocab 32000 (29.0M parameters); bfloat16 "
            "rows: bfloat16 params and grads (ferrograd keeps float32 moments, AdamW bfloat16 "
            "ones)",
        },
    )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else None)
