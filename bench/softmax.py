"""Softmax, float32, CPU: ferrograd's two-pass kernel vs its three-pass twins vs torch.

Kernel columns (``two_pass``, ``three_reload``, ``three_recompute``, ``torch_kernel`` =
``aten._softmax.out``) write into a preallocated output, so they measure the algorithms alone.
``fg_softmax`` and ``torch_softmax`` are the user-facing calls, each allocating its result.
All calls are timed in turn every round (medians), so drift on a shared machine hits them
alike. ``bw_frac`` is the two-pass kernel's speed as a fraction of the copy-bandwidth limit for
2 reads + 1 write per element.
"""

from __future__ import annotations

import sys

import torch
from harness import Bench, interleaved_times

import ferrograd as fg
from ferrograd import _core

SINGLE_ROWS = [10**3, 10**4, 10**5, 10**6, 10**7, 10**8]
BATCHED = [(2048, 32768), (32768, 4096), (64, 10**6)]


def case(bench: Bench, rows: int, n: int) -> None:
    x = torch.randn(rows, n)
    y = torch.empty_like(x)
    xa, ya = x.view(-1), y.view(-1)
    numel = rows * n
    t = interleaved_times(
        {
            "two": lambda: _core.softmax_forward(xa, ya, rows, n, 1, False),
            "reload": lambda: _core.softmax_three_pass(xa, ya, n, "reload"),
            "recompute": lambda: _core.softmax_three_pass(xa, ya, n, "recompute"),
            "torch_kernel": lambda: torch.ops.aten._softmax.out(x, -1, False, out=y),
            "ours": lambda: fg.softmax(x, -1),
            "theirs": lambda: torch.softmax(x, -1),
        },
        repeats=31 if numel <= 10**6 else 11,
    )
    two, reload, recompute, torch_kernel, ours, theirs = (
        t[k] for k in ("two", "reload", "recompute", "torch_kernel", "ours", "theirs")
    )
    ideal = 3 * 4 * numel / bench.bandwidth
    bench.add(
        {
            "shape": f"{rows}x{n}",
            "MB": round(4 * numel / 2**20, 1),
            "two_pass_ms": two * 1e3,
            "three_reload_ms": reload * 1e3,
            "three_recompute_ms": recompute * 1e3,
            "torch_kernel_ms": torch_kernel * 1e3,
            "fg_softmax_ms": ours * 1e3,
            "torch_softmax_ms": theirs * 1e3,
            "vs_reload": reload / two,
            "vs_recompute": recompute / two,
            "vs_torch_kernel": torch_kernel / two,
            "vs_torch": theirs / ours,
            "bw_frac": ideal / two,
        }
    )


def main(threads: int | None = None) -> None:
    if not hasattr(_core, "softmax_three_pass"):
        sys.exit("bench/softmax.py: the three-pass baseline needs a `dev` build (make develop)")
    bench = Bench("softmax", threads)
    print(f"copy bandwidth {bench.bandwidth / 1e9:.1f} GB/s, {bench.threads} threads")
    for n in SINGLE_ROWS:
        case(bench, 1, n)
    for rows, n in BATCHED:
        case(bench, rows, n)
    bench.save(
        {
            "vs_reload": "three-pass (reload) time / two-pass time, same kernel style",
            "vs_recompute": "three-pass (recompute) time / two-pass time",
            "vs_torch_kernel": "aten._softmax.out into the same preallocated output / two-pass",
            "vs_torch": "torch.softmax / fg.softmax, both allocating their output (page faults "
            "of fresh output pages dominate beyond ~100 MB)",
            "bw_frac": "(12 bytes/element at copy bandwidth) / two-pass time",
        }
    )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else None)
