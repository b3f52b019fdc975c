"""Optimizer step, float32 CPU: fg.optim.SPAM vs torch AdamW (fused / foreach) vs plain-torch SPAM.

Steps are timed in steady state (past SPAM's clip warm-up), each optimizer on its own copy of
the same parameters and gradients, all in turn every round. ``GBps`` counts the 28 bytes a
dense Adam-family step must move per parameter (read p, g, m, v; write p, m, v);
``bw_frac`` is that rate over the copy bandwidth. Sparse rows use density 0.25.
"""

from __future__ import annotations

import math
import sys

import torch
from harness import Bench, interleaved_times

import ferrograd as fg


class PlainSPAM:
    """SPAM's dense rule written with torch ops, as a user would without ferrograd."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, threshold=5000.0):
        self.params, self.lr, self.betas, self.eps, self.thr = params, lr, betas, eps, threshold
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.t = 0

    @torch.no_grad()
    def step(self):
        self.t += 1
        b1, b2 = self.betas
        for p, m, v in zip(self.params, self.m, self.v, strict=True):
            g = p.grad
            cap = (self.thr * v).sqrt()
            g = torch.where(g * g > self.thr * v, g.sign() * cap, g)
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (v / (1 - b2**self.t)).sqrt_().add_(self.eps)
            p.addcdiv_(m, denom, value=-self.lr / (1 - b1**self.t))


def state_bytes(opt: torch.optim.Optimizer, p: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in opt.state[p].values() if torch.is_tensor(t))


def case(bench: Bench, numel: int) -> None:
    cols = 1024
    shape = (numel // cols, cols)
    base = torch.randn(shape)
    grad = torch.randn(shape) * 1e-2
    params = {}

    def make(name, factory):
        p = torch.nn.Parameter(base.clone())
        p.grad = grad.clone()
        params[name] = p
        opt = factory([p])
        for _ in range(25):  # past the clip warm-up, state allocated
            opt.step()
        return opt

    opts = {
        "spam": make("spam", lambda ps: fg.optim.SPAM(ps, lr=1e-3)),
        "spam_sparse": make("spam_sparse", lambda ps: fg.optim.SPAM(ps, lr=1e-3, density=0.25)),
        "adamw_fused": make("adamw_fused", lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True)),
        "adamw_foreach": make(
            "adamw_foreach", lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True)
        ),
        "plain_spam": make("plain_spam", lambda ps: PlainSPAM(ps, lr=1e-3)),
    }
    t = interleaved_times({k: o.step for k, o in opts.items()}, repeats=7 if numel < 1e8 else 3)
    gbps = 28 * numel / t["spam"] / 1e9
    sparse_state = state_bytes(opts["spam_sparse"], params["spam_sparse"]) / numel
    bench.add(
        {
            "params": f"1e{round(math.log10(numel))}",
            "spam_ms": t["spam"] * 1e3,
            "adamw_fused_ms": t["adamw_fused"] * 1e3,
            "adamw_foreach_ms": t["adamw_foreach"] * 1e3,
            "plain_spam_ms": t["plain_spam"] * 1e3,
            "sparse_ms": t["spam_sparse"] * 1e3,
            "vs_fused": t["adamw_fused"] / t["spam"],
            "vs_foreach": t["adamw_foreach"] / t["spam"],
            "vs_plain": t["plain_spam"] / t["spam"],
            "sparse_speedup": t["spam"] / t["spam_sparse"],
            "sparse_state_B": sparse_state,
            "dense_state_B": state_bytes(opts["spam"], params["spam"]) / numel,
            "GBps": gbps,
            "bw_frac": gbps * 1e9 / bench.bandwidth,
        }
    )


def main(threads: int | None = None) -> None:
    bench = Bench("spam", threads)
    for numel in (2**20, 10 * 2**20, 100 * 2**20):
        case(bench, numel)
    bench.save(
        {
            "vs_fused": "torch.optim.AdamW(fused=True) step time / SPAM step time",
            "vs_plain": "plain-torch SPAM step time / SPAM step time",
            "sparse_state_B": "state bytes per parameter at density 0.25 (bound 2.125)",
            "sparse_speedup": "dense SPAM step time / density-0.25 SPAM step time",
            "params": "float32 parameters in one [n / 1024, 1024] tensor (2^20 * 1, 10, 100)",
        }
    )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else None)
