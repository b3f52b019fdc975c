"""Per-call cost on small inputs, where the call itself is most of the time: each ferrograd entry
point next to the torch call it stands in for, in µs per call (median over rounds of 1000 calls,
all calls timed in turn every round). ``grad`` rows run forward and backward.

A model makes thousands of such calls per step; this is what the op layer (argument checks, the
dispatcher, the Rust wrapper's tensor borrowing) costs on top of the kernels.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from harness import Bench

import ferrograd as fg

CALLS = 1000
ROUNDS = 15


def _grad(fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
    return lambda: fn().sum().backward()


def cases() -> dict[str, tuple[Callable, Callable]]:
    x = torch.randn(64, 512)
    xg = x.clone().requires_grad_()
    xs = torch.randn(8, 256)
    xsg = xs.clone().requires_grad_()
    sq = fg.nn.ShiftQuantLinear(256, 256)
    lin = torch.nn.Linear(256, 256)
    l1 = fg.nn.L1LayerNorm(256)
    ln = torch.nn.LayerNorm(256)
    e, c = torch.randn(8, 16), torch.randn(32, 16)
    eg = e.clone().requires_grad_()
    t = torch.randint(0, 32, (8,))
    w = torch.randn(256, 256, dtype=torch.bfloat16)
    w4 = fg.quant.quantize_w4(w, group_size=128)
    xb = torch.randn(1, 256, dtype=torch.bfloat16)
    return {
        "softmax [64,512]": (lambda: fg.softmax(x), lambda: torch.softmax(x, -1)),
        "softmax [64,512] grad": (
            _grad(lambda: fg.softmax(xg)),
            _grad(lambda: torch.softmax(xg, -1)),
        ),
        "ShiftQuantLinear [8,256]": (lambda: sq(xs).detach(), lambda: lin(xs).detach()),
        "ShiftQuantLinear [8,256] grad": (_grad(lambda: sq(xsg)), _grad(lambda: lin(xsg))),
        "L1LayerNorm [8,256]": (lambda: l1(xs).detach(), lambda: ln(xs).detach()),
        "linear_cross_entropy [8,16]x[32,16]": (
            lambda: fg.linear_cross_entropy(e, c, t),
            lambda: F.cross_entropy(e @ c.T, t),
        ),
        "linear_cross_entropy grad": (
            _grad(lambda: fg.linear_cross_entropy(eg, c, t)),
            _grad(lambda: F.cross_entropy(eg @ c.T, t)),
        ),
        "w4a16_matmul [1,256] bf16": (lambda: fg.w4a16_matmul(xb, w4), lambda: xb @ w.T),
    }


def _per_call_us(fns: dict[str, Callable]) -> dict[str, float]:
    for fn in fns.values():
        for _ in range(CALLS // 10):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(ROUNDS):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(CALLS):
                fn()
            times[name].append((time.perf_counter() - start) / CALLS * 1e6)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(threads: int | None = None) -> None:
    bench = Bench("overhead", threads)
    for name, (ours, theirs) in cases().items():
        t = _per_call_us({"ours": ours, "theirs": theirs})
        bench.add(
            {
                "call": name,
                "fg_us": t["ours"],
                "torch_us": t["theirs"],
                "vs_torch": t["theirs"] / t["ours"],
            }
        )
    bench.save(
        {
            "fg_us": "µs per ferrograd call (eager)",
            "torch_us": "µs per call of the torch op it stands in for (nn.Linear, nn.LayerNorm, "
            "F.cross_entropy on materialized logits, a bf16 matmul with the float weight)",
            "vs_torch": "torch time / ferrograd time",
        }
    )
