"""L1LayerNorm / L1RMSNorm on CPU against nn.LayerNorm / nn.RMSNorm on model-shaped inputs.

Every shape, float32 and bfloat16, forward (``fwd``) and forward + backward (``fwdbwd``: the
gradients of x, weight and bias, as training computes them), at 2 threads and 1 thread.
``ratio`` = torch time / ferrograd time (above 1: ferrograd is faster), timed in turn every
round (medians), so drift on a shared machine hits both alike.

bfloat16 is run the two ways a model runs it: a bf16 module on bf16 inputs (``bf16``), and a
float32 module on bf16 inputs under ``torch.autocast("cpu", bfloat16)`` (``bf16-autocast``);
torch's time is the faster of the two (``torch_setup`` says which), and ferrograd runs in that
same setup. Both give bf16 outputs and input gradients. In each setup torch's module runs eager
and through torch.compile (inductor fuses nn.RMSNorm's eager chain of ops, 1.2-24x faster on
a Zen 4 CPU); the baseline is the faster of the two, per phase (``fwd_baseline``,
``fwdbwd_baseline``).

Results go to bench/results/l1norm.json under the CPU model's name, next to those of other
CPUs. ``python bench/l1norm.py [threads...] [--quick]``.
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys

import torch
from harness import Bench, compiled_fresh, interleaved_times, machine, save_run, strongest_torch
from torch import nn

import ferrograd as fg

SHAPES = [(4096, 512), (1024, 512), (8192, 1024), (2048, 4096), (4, 256, 512)]
QUICK = [(4096, 512), (2048, 4096)]
NORMS = {
    "layer": (fg.nn.L1LayerNorm, nn.LayerNorm),
    "rms": (fg.nn.L1RMSNorm, nn.RMSNorm),
}
#: (input dtype, module dtype, autocast) per setup.
SETUPS = {
    "fp32": (torch.float32, torch.float32, False),
    "bf16": (torch.bfloat16, torch.bfloat16, False),
    "bf16-autocast": (torch.bfloat16, torch.float32, True),
}


def _repeats(numel: int) -> int:
    return 25 if numel <= 10**6 else 11


def _runs(module: nn.Module, x: torch.Tensor, g: torch.Tensor, autocast: bool):
    """(forward, forward + backward) of ``module`` as callables."""
    params = tuple(module.parameters())
    xg = x.clone().requires_grad_()

    def ctx():
        if autocast:
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def fwd():
        with torch.no_grad(), ctx():
            return module(x)

    def fwdbwd():
        with ctx():
            y = module(xg)
        return torch.autograd.grad(y, (xg, *params), g)

    return fwd, fwdbwd


def _modules(norm: str, n: int, dtype: torch.dtype):
    ours, theirs = NORMS[norm]
    a, b = ours(n).to(dtype), theirs(n).to(dtype)
    with torch.no_grad():  # the same non-trivial parameters in both
        for p, q in zip(a.parameters(), b.parameters(), strict=True):
            p.uniform_(0.5, 1.5)
            q.copy_(p)
    return a, b


def case(bench: Bench, norm: str, shape: tuple[int, ...], dtype: str) -> dict:
    n = shape[-1]
    setups = ["fp32"] if dtype == "fp32" else ["bf16", "bf16-autocast"]
    best = None
    for setup in setups:
        xdtype, mdtype, autocast = SETUPS[setup]
        x = torch.randn(shape).to(xdtype)
        g = torch.randn(shape).to(xdtype)
        ours, theirs = _modules(norm, n, mdtype)
        compiled = compiled_fresh(copy.deepcopy(theirs))
        (of, ob), (tf, tb), (cf, cb) = (_runs(m, x, g, autocast) for m in (ours, theirs, compiled))
        reps = _repeats(x.numel())
        faults: tuple[dict, dict] = ({}, {})
        fwd = interleaved_times({"fg": of, "eager": tf, "compiled": cf}, reps, faults=faults[0])
        both = interleaved_times({"fg": ob, "eager": tb, "compiled": cb}, reps, faults=faults[1])
        baselines = strongest_torch(fwd, both)
        for phase, f in zip(("fwd", "fwdbwd"), faults, strict=True):
            torch_kind = baselines[f"{phase}_baseline"]
            baselines |= {f"{phase}_fg_faults": f["fg"], f"{phase}_torch_faults": f[torch_kind]}
        if best is None or both["torch"] < best[1]["torch"]:
            best = (setup, both, fwd, baselines)
    setup, both, fwd, baselines = best
    row = {
        "norm": norm,
        "shape": "x".join(map(str, shape)),
        "dtype": dtype,
        "threads": bench.threads,
        "torch_setup": setup,
        "fwd_fg_us": fwd["fg"] * 1e6,
        "fwd_torch_us": fwd["torch"] * 1e6,
        "fwd_ratio": fwd["torch"] / fwd["fg"],
        "fwdbwd_fg_us": both["fg"] * 1e6,
        "fwdbwd_torch_us": both["torch"] * 1e6,
        "fwdbwd_ratio": both["torch"] / both["fg"],
        **baselines,
    }
    bench.add(row)
    return row


def main(threads: int | None = None, quick: bool = False) -> None:
    """1 and 2 threads, or only ``threads``."""
    counts = (threads,) if threads else (1, 2)
    load_before = os.getloadavg()
    rows = []
    for count in counts:
        bench = Bench("l1norm", count)
        for shape in QUICK if quick else SHAPES:
            for dtype in ("fp32", "bf16"):
                for norm in NORMS:
                    rows.append(case(bench, norm, shape, dtype))
    save_run(
        "l1norm",
        {
            "machine": machine(counts[0]),
            "notes": {
                "ratio": "torch time / ferrograd time, interleaved medians",
                "baseline": "nn.LayerNorm (L1LayerNorm) / nn.RMSNorm (L1RMSNorm), same dtype: "
                "the faster of eager and torch.compile'd (inductor) per phase (fwd_baseline, "
                "fwdbwd_baseline); *_eager_us and *_compiled_us keep both",
                "fwdbwd": "y = m(x); torch.autograd.grad(y, (x, *m.parameters()), g)",
                "faults": "*_faults: median minor page faults per call (glibc's trimmed heap "
                "faulted in again; the order of the calls rotates every round)",
                "bf16": "torch_setup: the faster torch setup, bf16 module or fp32 + autocast",
                "load_average": {"before": load_before, "after": os.getloadavg()},
            },
            "rows": rows,
        },
    )


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--quick"]
    main(int(args[0]) if args else None, quick="--quick" in sys.argv[1:])
