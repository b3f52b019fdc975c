"""SPAM / Stable-SPAM against plain-torch implementations of the rules in docs/definitions.md,
and the op ferrograd::spam_step (Rust pass) against its torch reference."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from support.distributed import fsdp2_on_cpu, spawn

import ferrograd as fg
from ferrograd.ops.spam import (
    adaclip_stats,
    adaclip_stats_many,
    mask_indices,
    reference,
    sample_mask,
    spam_step_many,
    spam_step_many_op,
    spam_step_op,
)

pytestmark = pytest.mark.simd


def make_grads(steps: int, shapes, seed=0, spikes=True):
    gen = torch.Generator().manual_seed(seed)
    grads = []
    for t in range(1, steps + 1):
        gs = [torch.randn(s, generator=gen) * 0.1 for s in shapes]
        if spikes and t % 97 == 0:  # planted 1000x spikes
            for g in gs:
                g.view(-1)[t % g.numel()] *= 1000.0
        grads.append(gs)
    return grads


class ReferenceSPAM:
    """SPAM in plain torch, float32; sparse coordinates taken from `active`."""

    def __init__(self, params, lr, betas, eps, wd, reset_interval, warmup_steps, threshold,
                 clip_warmup):  # fmt: skip
        self.params = [p.detach().clone() for p in params]
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.lr, self.betas, self.eps, self.wd = lr, betas, eps, wd
        self.R, self.W, self.thr, self.cw = reset_interval, warmup_steps, threshold, clip_warmup
        self.t = 0

    def step(self, grads, active=None):
        self.t += 1
        t, (b1, b2) = self.t, self.betas
        t0 = (t // self.R) * self.R
        if t % self.R == 0:
            for m, v in zip(self.m, self.v, strict=True):
                m.zero_()
                v.zero_()
        if t0 == 0:
            w = 1.0
        else:
            w = 1 - 0.99 * (1 + math.cos(math.pi * min(t - t0, self.W) / self.W)) / 2
        for i, (p, g) in enumerate(zip(self.params, grads, strict=True)):
            m, v = self.m[i], self.v[i]
            mask = torch.ones(p.numel(), dtype=torch.bool)
            if active is not None and active[i] is not None:
                mask = torch.zeros(p.numel(), dtype=torch.bool)
                mask[active[i]] = True
            mask = mask.view_as(p)
            g = g.clone()
            if t - t0 >= self.cw:
                spike = g * g > self.thr * v
                g = torch.where(spike, g.sign() * (self.thr * v).sqrt(), g)
            m_new = b1 * m + (1 - b1) * g
            v_new = b2 * v + (1 - b2) * g * g
            m.copy_(torch.where(mask, m_new, m))
            v.copy_(torch.where(mask, v_new, v))
            upd = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + self.eps)
            p.copy_(torch.where(mask, p * (1 - self.lr * self.wd) - self.lr * w * upd,
                                p * (1 - self.lr * self.wd)))  # fmt: skip


def run_spam(density, steps=1200, shapes=((24, 20), (20,)), **kw):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    hp = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.05)
    opt = fg.optim.SPAM(params, **hp, density=density, **kw)
    ref = ReferenceSPAM(params, hp["lr"], hp["betas"], hp["eps"], hp["weight_decay"],
                        kw.get("reset_interval", 500), kw.get("warmup_steps", 150),
                        kw.get("threshold", 5000.0), kw.get("clip_warmup", 20))  # fmt: skip
    for gs in make_grads(steps, shapes):
        for p, g in zip(params, gs, strict=True):
            p.grad = g.clone()
        opt.step()
        active = [opt.active_indices(p) if p.dim() >= 2 and density < 1 else None for p in params]
        ref.step(gs, active if density < 1 else None)
    return params, ref.params, opt


@pytest.mark.parametrize("density", [1.0, 0.3])
def test_spam_matches_reference_through_two_resets(density):
    params, want, opt = run_spam(density)
    for p, w in zip(params, want, strict=True):
        torch.testing.assert_close(p.detach(), w, rtol=1e-6, atol=1e-7)
    if density < 1:
        assert opt.active_indices(params[0]).numel() == round(0.3 * params[0].numel())


def reference_stable_spam(params, grads, lr, betas, eps, wd, g1, g2, g3, R, total, eta_min):
    ps = [p.detach().clone() for p in params]
    state = [dict(m=torch.zeros_like(p), v=torch.zeros_like(p), mmax=0.0, mn=0.0, vn=0.0)
             for p in ps]  # fmt: skip
    for t, gs in enumerate(grads, start=1):
        c = eta_min + (1 - eta_min) * 0.5 * (1 + math.cos(math.pi * min(t, total) / total))
        b1, gg1 = betas[0] * c, g1 * c
        if t % R == 0:
            for s in state:
                s["m"].zero_()
                s["v"].zero_()
        k = t if t < R else t - (t // R) * R + 1
        for p, g, s in zip(ps, gs, state, strict=True):
            gmax = g.abs().max().item()
            s["mmax"] = g3 * s["mmax"] + (1 - g3) * gmax
            mhat = s["mmax"] / (1 - g3**t)
            g = torch.where(g.abs() > mhat, g / gmax * mhat, g)
            n = g.double().norm().item()
            s["mn"] = gg1 * s["mn"] + (1 - gg1) * n
            s["vn"] = g2 * s["vn"] + (1 - g2) * n * n
            g = g / n * (s["mn"] / (1 - gg1**t)) / (math.sqrt(s["vn"] / (1 - g2**t)) + eps)
            s["m"].copy_(b1 * s["m"] + (1 - b1) * g)
            s["v"].copy_(betas[1] * s["v"] + (1 - betas[1]) * g * g)
            upd = (s["m"] / (1 - b1**k)) / ((s["v"] / (1 - betas[1] ** k)).sqrt() + eps)
            p.copy_(p * (1 - lr * wd) - lr * upd)
    return ps


# float64 parameters step in float64 with float64 moments (a parameter rounded to float32 on
# each step was 1e-7 off the float64 rule)
@pytest.mark.parametrize(
    "dtype, rtol, atol", [(torch.float32, 2e-6, 1e-6), (torch.float64, 0, 1e-12)]
)
def test_stable_spam_matches_reference(dtype, rtol, atol):
    torch.manual_seed(1)
    shapes = ((16, 12), (12,))
    params = [torch.nn.Parameter(torch.randn(s, dtype=dtype)) for s in shapes]
    hp = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    opt = fg.optim.StableSPAM(params, **hp, reset_interval=150, total_steps=400, eta_min=0.5)
    grads = [[g.to(dtype) for g in gs] for gs in make_grads(400, shapes, seed=2)]
    want = reference_stable_spam(params, grads, hp["lr"], hp["betas"], hp["eps"],
                                 hp["weight_decay"], 0.7, 0.9, 0.999, 150, 400, 0.5)  # fmt: skip
    for gs in grads:
        for p, g in zip(params, gs, strict=True):
            p.grad = g.clone()
        opt.step()
    for p, w in zip(params, want, strict=True):
        torch.testing.assert_close(p.detach(), w, rtol=rtol, atol=atol)


def step_args(shape, sparse, dtype=torch.float32, seed=4):
    """Arguments of ferrograd::spam_step: p, g, m, v, the scalars, mask (a third active)."""
    gen = torch.Generator().manual_seed(seed)
    p = torch.randn(shape, generator=gen).to(dtype)
    g = (torch.randn(shape, generator=gen) * 30).to(dtype)
    mask, _ = sample_mask(p.numel(), p.numel() // 3, 11)
    k = p.numel() // 3 if sparse else p.numel()
    m, v = torch.rand(k, generator=gen), torch.rand(k, generator=gen) * 1e-3
    # lr, weight_decay, betas, eps, bias corrections, warmup, spike_threshold, AdaClip, grad_scale
    scalars = (0.01, 0.1, 0.9, 0.99, 1e-6, 0.3, 0.02, 0.5, 50.0, math.inf, 1.0, 1.0)
    return (p, g, m, v, *scalars, mask if sparse else None)


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("shape", [(37, 29), (613, 301)])  # the second is split over threads
def test_rust_step_equals_torch_step(sparse, shape):
    fg.set_num_threads(max(2, fg.get_num_threads()))
    args = step_args(shape, sparse)
    p, _, m, v = args[:4]
    p0, p2, m2, v2 = p.clone(), p.clone(), m.clone(), v.clone()
    spam_step_op(*args)
    reference.spam_step(p2, args[1], m2, v2, *args[4:])
    # The last operation is a subtraction of two terms of the size of p0 and of the update:
    # where they cancel, a rounding difference of an ulp of those terms (torch's vector kernels
    # differ between CPUs) is large relative to p itself, so the bound is in their units.
    operands = p0.abs() + (p0 - p2).abs()
    assert ((p - p2).abs() <= 1e-6 * p2.abs() + 2**-22 * operands).all()
    torch.testing.assert_close(m, m2, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(v, v2, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("sparse", [False, True])
def test_bfloat16_rust_step_is_the_float32_step_rounded(sparse):
    """bfloat16 params and grads with float32 moments run the Rust pass: the same float32
    arithmetic on the widened values, rounded to nearest even once at the end, and within a
    bfloat16 rounding of the torch reference."""
    fg.set_num_threads(max(2, fg.get_num_threads()))
    args = step_args((613, 301), sparse, torch.bfloat16)
    p, g, m, v = args[:4]
    p32, m32, v32 = p.float(), m.clone(), v.clone()
    p_ref, m_ref, v_ref = p.clone(), m.clone(), v.clone()
    spam_step_op(*args)
    spam_step_op(p32, g.float(), m32, v32, *args[4:])
    assert torch.equal(p, p32.bfloat16())
    assert torch.equal(m, m32) and torch.equal(v, v32)
    reference.spam_step(p_ref, g, m_ref, v_ref, *args[4:])
    torch.testing.assert_close(p.float(), p_ref.float(), rtol=2**-7, atol=1e-6)
    torch.testing.assert_close(m, m_ref, rtol=1e-6, atol=1e-7)


def many_args(cases):
    """spam_step_many's arguments for tensors of (shape, sparse, dtype), each with its own
    AdaClip bound and ratio and AdaGN scale (the first dense one clips and scales nothing)."""
    tensors = [step_args(shape, sparse, dtype, seed=i) for i, (shape, sparse, dtype) in
               enumerate(cases)]  # fmt: skip
    shared = tensors[0][4:13] if tensors else step_args((1,), False)[4:13]
    per = [(math.inf, 1.0, 1.0)] + [(2.0 + i, 0.5, 1.0 + 0.1 * i) for i in range(len(cases))]
    lists = [list(column) for column in zip(*(t[:4] for t in tensors), strict=True)] or [[]] * 4
    return lists, shared, per[: len(cases)], [t[-1] for t in tensors]


MANY = [((613, 301), False, torch.float32), ((37, 29), True, torch.float32), ((5,), False,
        torch.float32), ((0, 3), False, torch.float32), ((300, 700), True, torch.bfloat16),
        ((64,), False, torch.bfloat16), ((9, 7), True, torch.float64)]  # fmt: skip


def test_many_tensors_step_as_each_alone():
    """One spam_step_many call (float32 and bfloat16 tensors each in one Rust pass, float64 by
    the reference) leaves every tensor with the bits of its own spam_step call."""
    fg.set_num_threads(max(2, fg.get_num_threads()))
    (ps, gs, ms, vs), shared, per, masks = many_args(MANY)
    alone = [[t.clone() for t in tensors] for tensors in zip(ps, gs, ms, vs, strict=True)]
    for (p, g, m, v), (bound, ratio, scale), mask in zip(alone, per, masks, strict=True):
        spam_step_op(p, g, m, v, *shared, bound, ratio, scale, mask)
    spam_step_many(ps, gs, ms, vs, *shared, adaclip_bounds=[b for b, _, _ in per],
                   adaclip_ratios=[r for _, r, _ in per], grad_scales=[c for _, _, c in per],
                   masks=masks)  # fmt: skip
    for i, (got, want) in enumerate(zip(zip(ps, gs, ms, vs, strict=True), alone, strict=True)):
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a, b), f"tensor {i}"


def test_spam_step_many_opcheck_and_refusals():
    cases = [((9, 7), False, torch.float32), ((4, 6), True, torch.float32), ((5,), False,
             torch.bfloat16)]  # fmt: skip
    (ps, gs, ms, vs), shared, per, masks = many_args(cases)
    per_lists = [[t[j] for t in per] for j in range(3)]
    torch.library.opcheck(spam_step_many_op, (ps, gs, ms, vs, *shared, *per_lists, masks))
    with pytest.raises(ValueError, match="spam_step_many: masks has 2 entries for 3 params"):
        spam_step_many(ps, gs, ms, vs, *shared, adaclip_bounds=per_lists[0],
                       adaclip_ratios=per_lists[1], grad_scales=per_lists[2],
                       masks=masks[:2])  # fmt: skip
    # one moment tensor handed to two parameters: refused before anything is written
    before = [t.clone() for t in ps]
    with pytest.raises(ValueError, match=r"spam_step: exp_avgs\[1\] overlaps exp_avgs\[0\]"):
        spam_step_many(ps[:2], gs[:2], [ms[0], ms[0][: ms[1].numel()]], vs[:2], *shared,
                       adaclip_bounds=per_lists[0][:2], adaclip_ratios=per_lists[1][:2],
                       grad_scales=per_lists[2][:2], masks=masks[:2])  # fmt: skip
    assert all(torch.equal(a, b) for a, b in zip(ps, before, strict=True))
    spam_step_many([], [], [], [], *shared, adaclip_bounds=[], adaclip_ratios=[],
                   grad_scales=[], masks=[])  # fmt: skip
    # the Rust pass takes one parameter dtype per call (the op's CPU kernel splits by dtype)
    from ferrograd import _core

    with pytest.raises(TypeError, match=r"spam_step: params\[1\] must have the dtype of params"):
        _core.spam_step_many([ps[0], ps[2]], [gs[0], gs[2]], [ms[0], ms[2]], [vs[0], vs[2]],
                             0.01, 0.0, (0.9, 0.99), 1e-6, (0.1, 0.01), 1.0, None,
                             [(math.inf, 1.0)] * 2, [1.0, 1.0], [None, None])  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("given_max", [False, True])
def test_adaclip_stats_match_the_torch_rule(dtype, given_max):
    """One Rust pass gives max |g|, the running max, bound, ratio and the clipped sum of squares
    as the rule in torch ops (float64 sums), spikes in a few chunks, across threads."""
    fg.set_num_threads(max(2, fg.get_num_threads()))
    gen = torch.Generator().manual_seed(9)
    g = torch.randn(300_001, generator=gen)
    g[[5, 77_777, 200_000]] = torch.tensor([-400.0, 250.0, 90.0])
    g = g.to(dtype)
    max_abs = float(g.float().abs().max()) * 1.5 if given_max else None  # another shard's
    got = adaclip_stats(g, max_abs, 3.0, 0.999, 1 - 0.999**1000)
    want = reference.adaclip_stats(g, max_abs, 3.0, 0.999, 1 - 0.999**1000)
    assert got[:4] == want[:4]  # the same float64 formulas
    assert got[2] < 90  # the bound clips the spikes
    assert math.isclose(got[4], want[4], rel_tol=1e-12)
    # float64 of the clipped float32 values, summed in float64: the reference's own oracle
    x = g.double().abs()
    clipped = torch.where(g.float().abs() > got[2], g.float() * got[3], g.float()).double()
    assert math.isclose(got[4], float((clipped * clipped).sum()), rel_tol=1e-12)
    assert x.max() == got[0] or given_max


def test_adaclip_stats_many_gives_each_gradient_its_own():
    """One call over gradients of both Rust dtypes, float64 (the reference), an empty one and
    one with a given max gives each the statistics of its own call."""
    fg.set_num_threads(max(2, fg.get_num_threads()))
    gen = torch.Generator().manual_seed(3)
    grads = [torch.randn(n, generator=gen).to(dtype) for n, dtype in [
        (300_001, torch.float32), (1000, torch.bfloat16), (0, torch.float32),
        (777, torch.float64), (50_000, torch.float32)]]  # fmt: skip
    grads[0][[9, 123_456]] = torch.tensor([300.0, -250.0])
    max_abs = [None, None, None, None, 7.5]
    running = [0.0, 1.0, 2.0, 3.0, 4.0]
    got = adaclip_stats_many(grads, max_abs, running, 0.999, 0.3)
    for g, m, r, stats in zip(grads, max_abs, running, got, strict=True):
        assert stats == adaclip_stats(g, m, r, 0.999, 0.3)
    with pytest.raises(ValueError, match="adaclip_stats: max_abs and running_maxes"):
        adaclip_stats_many(grads, max_abs[:2], running, 0.999, 0.3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adaclip_stats_clipping_every_chunk_of_several_gradients(dtype):
    """A step where the bound falls below entries of every chunk of several gradients (each
    chunk summed again, clipped) gives the torch rule's statistics for each."""
    fg.set_num_threads(max(2, fg.get_num_threads()))
    gen = torch.Generator().manual_seed(11)
    grads = [torch.randn(n, generator=gen).to(dtype) for n in (100_000, 9000, 40_000)]
    running = [0.5, 0.1, 2.0]  # bounds near 1: entries above them in every chunk
    got = adaclip_stats_many(grads, [None] * 3, running, 0.9, 1.0)
    for g, r, stats in zip(grads, running, got, strict=True):
        want = reference.adaclip_stats(g, None, r, 0.9, 1.0)
        assert stats[:4] == want[:4]
        assert stats[2] < 2.5 and stats[3] < 1  # clipped
        assert math.isclose(stats[4], want[4], rel_tol=1e-12)


def test_stable_spam_batches_step_as_tensor_by_tensor(monkeypatch):
    """Stable-SPAM's statistics and steps in cache-sized batches give the bits of one tensor at
    a time."""
    from ferrograd.optim import spam as spam_module

    shapes = [(300, 200), (64,), (128, 64), (1000,), (40, 40)]
    results = []
    for batch_bytes in (spam_module._BATCH_BYTES, 0):
        monkeypatch.setattr(spam_module, "_BATCH_BYTES", batch_bytes)
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
        opt = fg.optim.StableSPAM(params, lr=1e-2, weight_decay=0.01)
        for gs in make_grads(30, shapes):
            for p, g in zip(params, gs, strict=True):
                p.grad = g
            opt.step()
        results.append([p.detach().clone() for p in params])
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


def test_adaclip_stats_nan_and_empty():
    g = torch.ones(1000)
    g[3] = math.nan
    gmax, _, _, _, squares = adaclip_stats(g, None, 0.0, 0.9, 0.1)
    assert math.isnan(gmax) and math.isnan(squares)
    assert adaclip_stats(torch.ones(0), None, 2.0, 0.5, 0.5) == (0.0, 1.0, 2.0, 1.0, 0.0)


def test_mask_indices_read_the_bitmask_little_endian():
    mask, _ = sample_mask(1003, 300, 5)
    want = np.flatnonzero(np.unpackbits(mask.numpy(), bitorder="little")[:1003])
    assert torch.equal(mask_indices(mask, 1003), torch.from_numpy(want.astype(np.int64)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("sparse", [False, True])
def test_spam_step_opcheck(sparse, dtype):
    # float32 runs the Rust pass; bfloat16 and float64 the reference inside the CPU kernel.
    torch.library.opcheck(spam_step_op, step_args((9, 7), sparse, dtype))


def test_spam_step_compiles_fullgraph_like_eager():
    def two_steps(p, g, m, v, mask):
        for bias_corrections in ((0.1, 0.001), (0.19, 0.002)):
            torch.ops.ferrograd.spam_step(
                p, g, m, v, 0.01, 0.1, 0.9, 0.999, 1e-6, *bias_corrections, 0.5, 50.0,
                math.inf, 1.0, 1.0, mask,
            )  # fmt: skip
        return p * 2

    compiled = torch.compile(two_steps, fullgraph=True)
    for sparse in (False, True):
        eager = step_args((12, 10), sparse)
        traced = [t.clone() if isinstance(t, torch.Tensor) else t for t in eager]
        want = two_steps(*eager[:4], eager[-1])
        got = compiled(*traced[:4], traced[-1])
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        for a, b in zip(traced[:4], eager[:4], strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_spam_step_many_compiles_fullgraph_like_eager():
    cases = [((12, 10), False, torch.float32), ((6, 8), True, torch.float32), ((7,), False,
             torch.bfloat16)]  # fmt: skip

    def step(ps, gs, ms, vs, shared, per, masks):
        torch.ops.ferrograd.spam_step_many(ps, gs, ms, vs, *shared, *per, masks)
        return [p * 2 for p in ps]

    compiled = torch.compile(step, fullgraph=True)
    (ps, gs, ms, vs), shared, per, masks = many_args(cases)
    per = [[t[j] for t in per] for j in range(3)]
    traced = [[t.clone() for t in column] for column in (ps, gs, ms, vs)]
    want = step(ps, gs, ms, vs, shared, per, masks)
    got = compiled(*traced, shared, per, masks)
    for a, b in zip([*got, *traced[0], *traced[2], *traced[3]], [*want, *ps, *ms, *vs],
                    strict=True):  # fmt: skip
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("cls", [fg.optim.SPAM, fg.optim.StableSPAM])
def test_resume_from_state_dict_is_bit_identical(cls):
    shapes = ((20, 10), (10,))
    grads = make_grads(240, shapes, seed=5)

    def fresh():
        torch.manual_seed(3)
        params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
        return params, cls(params, lr=1e-2, density=0.4, reset_interval=100, seed=7)

    def run(params, opt, gs):
        for g_step in gs:
            for p, g in zip(params, g_step, strict=True):
                p.grad = g.clone()
            opt.step()

    params, opt = fresh()
    run(params, opt, grads)
    params2, opt2 = fresh()
    run(params2, opt2, grads[:130])
    saved = copy.deepcopy(opt2.state_dict())
    saved_params = [p.detach().clone() for p in params2]
    params3, opt3 = fresh()
    with torch.no_grad():
        for p, s in zip(params3, saved_params, strict=True):
            p.copy_(s)
    opt3.load_state_dict(saved)
    run(params3, opt3, grads[130:])
    for a, b in zip(params, params3, strict=True):
        assert torch.equal(a, b)


def test_sparse_state_memory_and_seeds():
    p = torch.nn.Parameter(torch.randn(256, 128))
    opt = fg.optim.SPAM([p], density=0.25, seed=1)
    p.grad = torch.randn_like(p)
    opt.step()
    state_bytes = sum(t.numel() * t.element_size() for t in opt.state[p].values()
                      if isinstance(t, torch.Tensor))  # fmt: skip
    assert state_bytes / p.numel() <= 8 * 0.25 + 0.125
    assert opt.active_indices(p).numel() == round(0.25 * p.numel())
    other = fg.optim.SPAM([p], density=0.25, seed=1)
    other.step()
    assert torch.equal(other.active_indices(p), opt.active_indices(p))
    third = fg.optim.SPAM([p], density=0.25, seed=2)
    third.step()
    assert not torch.equal(third.active_indices(p), opt.active_indices(p))
    idx = opt.active_indices(p)
    assert idx.dtype == torch.int64 and torch.equal(idx, idx.sort().values)


def test_groups_closures_and_skipped_params():
    a = torch.nn.Parameter(torch.ones(8, 4))
    b = torch.nn.Parameter(torch.ones(4))
    c = torch.nn.Parameter(torch.ones(3))  # never gets a gradient
    opt = fg.optim.SPAM([{"params": [a], "lr": 0.1, "density": 0.5}, {"params": [b, c]}], lr=0.01)

    def closure():
        opt.zero_grad()
        loss = (a.sum() + b.sum()) ** 2
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.item() == (32 + 4) ** 2
    assert torch.equal(c, torch.ones(3)) and "exp_avg" not in opt.state[c]
    assert opt.active_indices(a).numel() == 16
    assert (a != 1).sum() == 16 and (b != 1).all()


@pytest.mark.parametrize(
    "cls, density",
    [(fg.optim.SPAM, 1.0), (fg.optim.SPAM, 0.5), (fg.optim.StableSPAM, 1.0)],
)
def test_bfloat16_params_follow_float32(cls, density):
    torch.manual_seed(0)
    p32 = torch.nn.Parameter(torch.randn(16, 8).bfloat16().float())
    p16 = torch.nn.Parameter(p32.detach().bfloat16())
    o32 = cls([p32], lr=1e-2, density=density, seed=4)
    o16 = cls([p16], lr=1e-2, density=density, seed=4)
    for gs in make_grads(20, [(16, 8)], spikes=False):
        p32.grad, p16.grad = gs[0].bfloat16().float(), gs[0].bfloat16()
        o32.step()
        o16.step()
        with torch.no_grad():
            p32.copy_(p32.bfloat16().float())
    assert o16.state[p16]["exp_avg"].dtype == torch.float32
    # bfloat16 params with float32 state behave as float32 params rounded after every step:
    # the same bits, as the fused pass widens, steps in float32 and rounds once.
    assert torch.equal(p16.float(), p32.detach())


def test_bad_arguments_and_sparse_gradients():
    p = torch.nn.Parameter(torch.ones(4, 4))
    with pytest.raises(ValueError, match="SPAM: lr"):
        fg.optim.SPAM([p], lr=-1)
    with pytest.raises(ValueError, match="SPAM: density"):
        fg.optim.SPAM([p], density=1.5)
    with pytest.raises(ValueError, match="StableSPAM: gamma1"):
        fg.optim.StableSPAM([p], gamma1=1.0)
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = fg.optim.SPAM(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()
    # complex parameters: refused up front (the step dropped the imaginary parts before)
    z = torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))
    for cls in (fg.optim.SPAM, fg.optim.StableSPAM):
        with pytest.raises(TypeError, match=r"complex parameters .* params\[1\]"):
            cls([p, z])
        opt = cls([p])
        with pytest.raises(TypeError, match="complex parameters"):
            opt.add_param_group({"params": [z]})


def _ddp_worker(rank: int, world: int) -> bool:
    import torch.distributed as dist

    torch.manual_seed(0)  # identical initial replicas
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = fg.optim.SPAM(ddp.parameters(), lr=1e-2, density=0.5, reset_interval=7, seed=3)
    gen = torch.Generator().manual_seed(100 + rank)  # different data per rank
    for _ in range(20):
        x = torch.randn(4, 8, generator=gen)
        opt.zero_grad()
        ddp(x).pow(2).mean().backward()
        opt.step()
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    return all(torch.equal(gathered[0], g) for g in gathered)


def test_ddp_with_gloo_keeps_replicas_identical():
    assert spawn(_ddp_worker) == {0: True, 1: True}


def _fsdp2_worker(rank: int, world: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    results = {}
    for cls in (fg.optim.SPAM, fg.optim.StableSPAM):

        def model():
            torch.manual_seed(0)
            return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(),
                                       torch.nn.Linear(16, 1))  # fmt: skip

        sharded, plain = model(), model()
        fully_shard(sharded, mesh=mesh)
        opt = cls(sharded.parameters(), lr=1e-2, reset_interval=7)
        ref = cls(plain.parameters(), lr=1e-2, reset_interval=7)
        for step in range(15):
            batches = [torch.randn(4, 8, generator=torch.Generator().manual_seed(step * 10 + r))
                       for r in range(world)]  # fmt: skip
            opt.zero_grad()
            sharded(batches[rank]).pow(2).mean().backward()
            opt.step()
            ref.zero_grad()
            # FSDP averages the ranks' gradients: the mean of the per-rank losses.
            (sum(plain(b).pow(2).mean() for b in batches) / world).backward()
            ref.step()
        full = [p.full_tensor() for p in sharded.parameters()]
        results[cls.__name__] = all(
            torch.allclose(f, q.detach(), rtol=1e-5, atol=1e-6)
            for f, q in zip(full, plain.parameters(), strict=True)
        )
    return results


@fsdp2_on_cpu
def test_fsdp2_steps_the_local_shard_like_an_unsharded_run():
    results = spawn(_fsdp2_worker)
    assert results == {r: {"SPAM": True, "StableSPAM": True} for r in range(2)}


def trained(cls, density=0.5, steps=3):
    """An optimizer over a sparse-eligible matrix and a vector after a few steps."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(6, 5)), torch.nn.Parameter(torch.randn(7))]
    opt = cls(params, lr=1e-2, density=density, seed=1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    return params, opt


def corrupt(state: dict, index: int, key: str, value) -> dict:
    state = copy.deepcopy(state)
    state["state"][index][key] = value
    return state


@pytest.mark.parametrize("cls", [fg.optim.SPAM, fg.optim.StableSPAM])
def test_load_state_dict_refuses_corrupted_state_naming_the_key(cls):
    params, opt = trained(cls)
    good = opt.state_dict()
    m0, v1 = good["state"][0]["exp_avg"], good["state"][1]["exp_avg_sq"]
    mask = good["state"][0]["mask"]
    bad = [
        (corrupt(good, 1, "exp_avg", torch.zeros(7, 1)), r"state\[1\]\['exp_avg'\] must have"),
        (corrupt(good, 1, "exp_avg_sq", -v1.abs()), r"state\[1\]\['exp_avg_sq'\] must be >= 0"),
        (
            corrupt(good, 1, "exp_avg_sq", v1.double()),
            r"state\[1\]\['exp_avg_sq'\] must be a float32",
        ),
        (corrupt(good, 0, "exp_avg", m0[:-1]), r"state\[0\]\['exp_avg'\] must have shape"),
        (corrupt(good, 0, "mask", mask.int()), r"state\[0\]\['mask'\] must be a uint8"),
        (corrupt(good, 0, "mask", mask[:-1]), r"state\[0\]\['mask'\] must have shape"),
        (corrupt(good, 0, "mask", mask | 255), r"state\[0\]\['mask'\] must mark exactly 15"),
        (
            corrupt(good, 1, "mask", torch.ones(1, dtype=torch.uint8)),
            r"state\[1\]\['mask'\] found for a dense parameter",
        ),
    ]
    fresh_state = fg.optim.SPAM(params, density=1.0).state_dict()  # dense moments, no mask
    dense = copy.deepcopy(good)
    dense["state"][0] = {"exp_avg": torch.zeros(6, 5), "exp_avg_sq": torch.zeros(6, 5)}
    bad.append((dense, r"state\[0\]\['mask'\] must be a uint8 bitmask \(a sparse group"))
    no_mask = copy.deepcopy(good)
    del no_mask["state"][0]["mask"]
    bad.append((no_mask, r"state\[0\]\['mask'\]"))
    sparse_into_dense = copy.deepcopy(good)
    for group in sparse_into_dense["param_groups"]:
        group["density"] = 1.0
    bad.append((sparse_into_dense, r"state\[0\]\['mask'\] found for a dense parameter"))
    bad.append((corrupt(good, 0, "exp_avg", m0.double()), r"state\[0\]\['exp_avg'\] must be a"))
    glob = copy.deepcopy(good)
    glob["state"]["spam"]["step"] = -1
    bad.append((glob, r"state\['spam'\]\['step'\]"))
    lr = copy.deepcopy(good)
    lr["param_groups"][0]["lr"] = math.inf
    bad.append((lr, rf"param_groups\[0\]: {cls.__name__}: lr"))
    if cls is fg.optim.StableSPAM:
        for key in ("norm_v", "norm_m", "max_abs"):
            bad.append((corrupt(good, 1, key, -1.0), rf"state\[1\]\['{key}'\] must be a finite"))
    for state, match in bad:
        before = copy.deepcopy(opt.state_dict())
        with pytest.raises(ValueError, match=f"{cls.__name__}.load_state_dict: " + match):
            opt.load_state_dict(state)
        after = opt.state_dict()  # nothing was loaded
        assert after["state"][0]["exp_avg"].equal(before["state"][0]["exp_avg"])
    assert fresh_state["state"] == {"spam": {"step": 0, "rng": 0}}
    opt.load_state_dict(good)  # a valid state still loads


def test_loaded_moments_are_contiguous_copies():
    params, opt = trained(fg.optim.SPAM, density=1.0)
    want = copy.deepcopy(opt)
    state = copy.deepcopy(opt.state_dict())
    for key in ("exp_avg", "exp_avg_sq"):
        state["state"][0][key] = state["state"][0][key].t().contiguous().t()  # column-major
    opt.load_state_dict(state)
    assert opt.state[params[0]]["exp_avg"].is_contiguous()
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    want_params = want.param_groups[0]["params"]
    for p in want_params:
        p.grad = torch.ones_like(p)
    want.step()
    for a, b in zip(params, want_params, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"warmup_steps": None}, TypeError, "SPAM: warmup_steps must be an int"),
        ({"warmup_steps": -1}, ValueError, "SPAM: warmup_steps must be in"),
        ({"warmup_steps": 1.5}, TypeError, "SPAM: warmup_steps must be an int"),
        ({"clip_warmup": -2}, ValueError, "SPAM: clip_warmup must be in"),
        ({"clip_warmup": 2.0}, TypeError, "SPAM: clip_warmup must be an int"),
        ({"reset_interval": 2.5}, TypeError, "SPAM: reset_interval must be an int"),
        ({"reset_interval": 0}, ValueError, "SPAM: reset_interval must be in"),
        ({"lr": math.inf}, ValueError, "SPAM: lr must be in"),
        ({"lr": math.nan}, ValueError, "SPAM: lr must be in"),
        ({"eps": math.inf}, ValueError, "SPAM: eps must be in"),
        ({"seed": 2**64}, ValueError, "SPAM: seed must be in"),
        ({"threshold": -1.0}, ValueError, "SPAM: threshold must be in"),
    ],
)
def test_spam_options_out_of_range(kwargs, error, match):
    p = torch.nn.Parameter(torch.ones(4, 4))
    with pytest.raises(error, match=match):
        fg.optim.SPAM([p], **kwargs)
    if "seed" not in kwargs:
        with pytest.raises(error, match=match):  # a group's own options too
            fg.optim.SPAM([{"params": [p], **kwargs}])


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"eta_min": -0.1}, ValueError, "StableSPAM: eta_min must be in"),
        ({"eta_min": 1.5}, ValueError, "StableSPAM: eta_min must be in"),
        ({"total_steps": 10.5}, TypeError, "StableSPAM: total_steps must be an int"),
        ({"total_steps": 0}, ValueError, "StableSPAM: total_steps must be in"),
        ({"lr": math.inf}, ValueError, "StableSPAM: lr must be in"),
        ({"reset_interval": -3}, ValueError, "StableSPAM: reset_interval must be in"),
    ],
)
def test_stable_spam_options_out_of_range(kwargs, error, match):
    p = torch.nn.Parameter(torch.ones(4, 4))
    with pytest.raises(error, match=match):
        fg.optim.StableSPAM([p], **kwargs)


def test_warmup_steps_zero_means_no_warmup():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = fg.optim.SPAM([p], lr=0.1, reset_interval=2, warmup_steps=0)
    for _ in range(2):
        p.grad = torch.ones(3)
        opt.step()
    # Step 2 resets the moments and steps with warm-up factor 1 (not 0.01).
    (b1, b2), eps = (0.9, 0.999), 1e-6
    m_hat, v_hat = (1 - b1) / (1 - b1**2), (1 - b2) / (1 - b2**2)
    want = -0.1 / (1 + eps) - 0.1 * m_hat / (math.sqrt(v_hat) + eps)
    torch.testing.assert_close(p.detach(), torch.full((3,), want), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", [fg.optim.SPAM, fg.optim.StableSPAM])
def test_eps_zero_is_refused_and_a_zero_gradient_steps_weight_decay_only(cls):
    """The step divides by sqrt(v_hat) + eps: 0 / 0 for a coordinate that never had a gradient
    (a ZeroDivisionError in Stable-SPAM's AdaGN before), so eps must be positive."""
    p = torch.nn.Parameter(torch.ones(4, 4))
    for eps in (0.0, 1e-300):  # 1e-300 is 0 in float32
        with pytest.raises(ValueError, match=f"{cls.__name__}: eps must be positive"):
            cls([p], eps=eps)
    opt = cls([p], lr=0.1, eps=1e-30, weight_decay=0.1)
    p.grad = torch.zeros(4, 4)
    opt.step()
    assert torch.equal(p.detach(), torch.full((4, 4), 1 - 0.1 * 0.1))


@pytest.mark.simd
def test_a_nan_gradient_under_spike_clipping_reaches_the_parameter():
    """Fuzz finding: with clipping active a NaN gradient entry was capped to a finite value
    (f32 max / min drop NaN), so the step hid it; the rule (torch.minimum / maximum) and torch's
    Adam give NaN."""
    p = torch.nn.Parameter(torch.ones(40))
    opt = fg.optim.SPAM([p], lr=0.1, clip_warmup=1, warmup_steps=0)
    for g in (torch.full((40,), 0.1), torch.full((40,), 0.1)):
        p.grad = g.clone()
        opt.step()
    p.grad = torch.full((40,), 0.2)
    p.grad[3] = float("nan")
    opt.step()
    assert torch.isnan(p.detach()[3]) and torch.isfinite(p.detach()[torch.arange(40) != 3]).all()


def test_spam_betas_and_threshold_errors_name_the_argument():
    p = torch.nn.Parameter(torch.ones(4))
    for cls in (fg.optim.SPAM, fg.optim.StableSPAM):
        with pytest.raises(TypeError, match=f"{cls.__name__}: betas must be a pair"):
            cls([p], betas=None)
    with pytest.raises(ValueError, match="SPAM: threshold must be positive"):
        fg.optim.SPAM([p], threshold=0.0)
    fg.optim.SPAM([p], threshold=float("inf"))  # no spike clipping


def test_spam_keeps_float64_precision():
    """float64 parameters step in float64 with float64 moments, as torch's optimizers keep
    them: within 1e-12 of the float64 rule after hundreds of steps through resets (a parameter
    rounded to float32 on each step was 1e-7 off, float32 moments 5e-8). Stable-SPAM:
    test_stable_spam_matches_reference."""
    shapes = ((24, 20), (20,))
    grads = [[g.double() for g in gs] for gs in make_grads(260, shapes, seed=3)]
    hp = dict(lr=1e-2, betas=(0.9, 0.999), weight_decay=0.05)
    for density in (1.0, 0.3):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, dtype=torch.float64)) for s in shapes]
        opt = fg.optim.SPAM(params, **hp, eps=1e-6, density=density, reset_interval=100,
                            warmup_steps=20, threshold=50.0, clip_warmup=5)  # fmt: skip
        ref = ReferenceSPAM(params, hp["lr"], hp["betas"], 1e-6, hp["weight_decay"], 100, 20,
                            50.0, 5)  # fmt: skip
        for gs in grads:
            for p, g in zip(params, gs, strict=True):
                p.grad = g.clone()
            opt.step()
            active = [opt.active_indices(p) if p.dim() >= 2 else None for p in params]
            ref.step(gs, active if density < 1 else None)
        for p, w in zip(params, ref.params, strict=True):
            torch.testing.assert_close(p.detach(), w, rtol=0, atol=1e-12)
        assert all(opt.state[p]["exp_avg"].dtype == torch.float64 for p in params)
