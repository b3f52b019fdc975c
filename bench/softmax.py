"""Softmax / log-softmax on CPU: ferrograd against torch on model-shaped inputs.

``sweep``: every shape (small rows, attention scores [B, H, T, T], vocabulary rows [N, V],
single long rows), float32 and bfloat16, forward (``fwd``) and forward + backward (``fwdbwd``),
at 2 threads and 1 thread. ``ratio`` = torch time / ferrograd time (above 1: ferrograd is
faster), both calls allocating their result as a user's would, timed in turn every round
(medians), so drift on a shared machine hits them alike; torch's time is the faster of its
eager op and the op through torch.compile (inductor), per phase. ``bw_frac`` (long fp32 rows): the
forward's speed as a fraction of copy bandwidth for 2 reads + 1 write per element.

``kernels``: float32 single rows, preallocated outputs: the two-pass kernel against its
three-pass twins and ``aten._softmax.out`` (the algorithms alone).

Results go to bench/results/softmax.json under the CPU model's name, next to those of other
CPUs. ``python bench/softmax.py [threads...] [--quick]``.
"""

from __future__ import annotations

import sys

import torch
from harness import Bench, compiled_fresh, interleaved_times, machine, save_run, strongest_torch

import ferrograd as fg
from ferrograd import _core

SWEEP = [
    (1000,),
    (64, 512),
    (8, 8, 128, 128),
    (16, 4, 256, 256),
    (4, 8, 512, 512),
    (1, 8, 1024, 1024),
    (64, 16384),
    (64, 32000),
    (512, 32000),
    (512, 128256),
    (128, 256000),
    (2048, 32768),
    (1, 10**7),
    (1, 10**8),
]
QUICK = [(1000,), (64, 512), (16, 4, 256, 256), (512, 32000), (1, 10**7)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
OPS = {"softmax": (fg.softmax, torch.softmax), "log_softmax": (fg.log_softmax, torch.log_softmax)}
SINGLE_ROWS = [10**3, 10**5, 10**7]


def _repeats(numel: int) -> int:
    return 41 if numel <= 10**5 else 15 if numel <= 10**7 else 7


def sweep_case(bench: Bench, op: str, shape: tuple[int, ...], dtype: str) -> dict:
    ours, theirs = OPS[op]
    compiled = compiled_fresh(lambda t, dim: theirs(t, dim))
    x = torch.randn(shape, dtype=DTYPES[dtype]) * 4
    g = torch.randn(shape, dtype=DTYPES[dtype])
    xg = x.clone().requires_grad_()

    def fwdbwd(fn):
        return lambda: torch.autograd.grad(fn(xg, -1), xg, g)

    fns = {"fg": ours, "eager": theirs, "compiled": compiled}
    fwd = interleaved_times(
        {name: (lambda fn=fn: fn(x, -1)) for name, fn in fns.items()}, _repeats(x.numel())
    )
    both = interleaved_times(
        {name: fwdbwd(fn) for name, fn in fns.items()}, max(5, _repeats(x.numel()) // 2)
    )
    baselines = strongest_torch(fwd, both)
    row = {
        "op": op,
        "shape": "x".join(map(str, shape)),
        "dtype": dtype,
        "threads": bench.threads,
        "fwd_fg_us": fwd["fg"] * 1e6,
        "fwd_torch_us": fwd["torch"] * 1e6,
        "fwd_ratio": fwd["torch"] / fwd["fg"],
        "fwdbwd_fg_us": both["fg"] * 1e6,
        "fwdbwd_torch_us": both["torch"] * 1e6,
        "fwdbwd_ratio": both["torch"] / both["fg"],
        **baselines,
    }
    if shape[0] == 1 and x.numel() >= 10**7:
        row["bw_frac"] = 3 * x.element_size() * x.numel() / bench.bandwidth / fwd["fg"]
    bench.add(row)
    return row


def kernel_case(bench: Bench, n: int) -> dict:
    x = torch.randn(n)
    y = torch.empty_like(x)
    t = interleaved_times(
        {
            "two": lambda: _core.softmax_forward(x, y, 1, n, 1, False),
            "reload": lambda: _core.softmax_three_pass(x, y, n, "reload"),
            "recompute": lambda: _core.softmax_three_pass(x, y, n, "recompute"),
            "torch_kernel": lambda: torch.ops.aten._softmax.out(x, -1, False, out=y),
        },
        repeats=_repeats(n),
    )
    row = {
        "n": n,
        "threads": bench.threads,
        "two_pass_us": t["two"] * 1e6,
        "vs_reload": t["reload"] / t["two"],
        "vs_recompute": t["recompute"] / t["two"],
        "vs_torch_kernel": t["torch_kernel"] / t["two"],
        "bw_frac": 12 * n / bench.bandwidth / t["two"],
    }
    bench.add(row)
    return row


def main(threads: int | None = None, quick: bool = False) -> None:
    if not hasattr(_core, "softmax_three_pass"):
        sys.exit("bench/softmax.py: the three-pass baseline needs a `dev` build (make develop)")
    counts = [threads] if threads else [2, 1]
    sweep, kernels, bandwidth = [], [], None
    for count in counts:
        bench = Bench("softmax", count)
        bench._bandwidth = bandwidth  # measured once
        bandwidth = bench.bandwidth
        print(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s, {bench.threads} threads")
        for shape in QUICK if quick else SWEEP:
            for dtype in DTYPES:
                for op in OPS:
                    sweep.append(sweep_case(bench, op, shape, dtype))
        bench.rows = []
        for n in SINGLE_ROWS:
            kernels.append(kernel_case(bench, n))
    save_run(
        "softmax",
        {
            "machine": machine(counts[0]),
            "copy_bandwidth_GBps": round(bandwidth / 1e9, 2),
            "notes": {
                "ratio": "torch time / ferrograd time, both allocating outputs, interleaved; torch "
                "is the faster of eager and torch.compile'd (inductor) per phase (fwd_baseline, "
                "fwdbwd_baseline); *_eager_us and *_compiled_us keep both",
                "fwdbwd": "y = f(x); torch.autograd.grad(y, x, g)",
                "bw_frac": "(2 reads + 1 write per element at copy bandwidth) / forward time",
                "kernels": "preallocated float32 outputs: vs_* = other kernel time / ferrograd's "
                "(two_pass_us: the two-pass kernel with AVX-512; with AVX2 or scalar code rows of "
                "10^7 take the in-cache kernel's three passes, docs/softmax.md)",
            },
            "sweep": sweep,
            "kernels": kernels,
        },
    )


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--quick"]
    main(int(args[0]) if args else None, quick="--quick" in sys.argv[1:])
