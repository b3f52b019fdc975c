"""Vocabulary-parallel fg.linear_cross_entropy(..., process_group=pg) on 2-process gloo groups
against the definition in float64 with the whole vocabulary's logits materialized: the loss, the
lse, the summed gradient of e and each rank's shard of the gradients of c and bias, for every
option, even and uneven shards; the ranks' agreement refusing bad input on every rank; the
per-shard op ``linear_cross_entropy_parts``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from support.distributed import spawn

import ferrograd as fg
from ferrograd.ops.cce import parallel, reference

IGNORE = -100
VOCAB, DIM, SHAPE = 37, 24, (3, 20)
#: Rows of c per rank: even, uneven, and a one-row shard.
SPLITS = [(19, 18), (36, 1)]
OPTIONS = [
    {},
    {"bias": True},
    {"softcap": 2.5},
    {"label_smoothing": 0.1},
    {"z_loss": 1e-2},
    {"shift": 1},
    {"shift": 3, "bias": True, "softcap": 4.0, "label_smoothing": 0.2, "z_loss": 1e-3},
    {"ignore_index": 7},
    {"ignored": 1.0},  # every token ignored: mean 0, gradients 0
    {"filter_eps": None, "label_smoothing": 0.3, "softcap": 3.0},
]
TOLERANCES = {torch.float64: 1e-10, torch.float32: 2e-5}


def definition(e, c, targets, bias, ignore_index, softcap, reduction, shift, ls, z_loss):
    """The loss and lse in float64 from the materialized [N, V] logits."""
    if shift:
        e, targets = e[..., :-shift, :], targets[..., shift:]
    z = e @ c.T + (0.0 if bias is None else bias)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    flat_z, flat_t = z.reshape(-1, c.shape[0]), targets.reshape(-1)
    row = F.cross_entropy(
        flat_z, flat_t, ignore_index=ignore_index, label_smoothing=ls, reduction="none"
    )
    lse = torch.logsumexp(flat_z, -1)
    valid = flat_t != ignore_index
    row = row + z_loss * lse**2 * valid
    if reduction == "none":
        loss = row.view(targets.shape)
    elif reduction == "sum":
        loss = row.sum()
    else:
        loss = row.sum() / valid.sum().clamp(min=1)
    return loss, lse.view(targets.shape)


def inputs(options: dict, seed: int = 0):
    """e, c, bias (float64, the whole vocabulary) and targets, the same on every rank."""
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(*SHAPE, DIM, generator=g, dtype=torch.float64)
    c = torch.randn(VOCAB, DIM, generator=g, dtype=torch.float64) / DIM**0.5 * 2
    bias = torch.randn(VOCAB, generator=g, dtype=torch.float64) * 0.5
    targets = torch.randint(0, VOCAB, SHAPE, generator=g)
    ignore = options.get("ignore_index", IGNORE)
    targets[torch.rand(SHAPE, generator=g) < options.get("ignored", 0.2)] = ignore
    return e, c, bias, targets


def worst_ratio(ours: torch.Tensor, want: torch.Tensor, tol: float, grad: bool) -> float:
    """max |ours - want| / (atol + tol |want|), atol = tol (times max |want| for gradients):
    at most 1 passes."""
    atol = tol * float(want.abs().max()) if grad and want.numel() else tol
    err = (ours.double() - want).abs() / (atol + tol * want.abs())
    return float(err.max()) if err.numel() else 0.0


def one_case(pg, rank, split, dtype, options, reduction) -> dict:
    import torch.distributed as dist

    kw = {k: v for k, v in options.items() if k not in ("bias", "ignored")}
    e, c, bias, targets = inputs(options)
    use_bias = options.get("bias", False)
    lo, hi = sum(split[:rank]), sum(split[: rank + 1])
    leaves = [e.to(dtype).requires_grad_(), c[lo:hi].to(dtype).requires_grad_()]
    if use_bias:
        leaves.append(bias[lo:hi].to(dtype).requires_grad_())
    loss, lse = fg.linear_cross_entropy(
        leaves[0], leaves[1], targets, bias=leaves[2] if use_bias else None, reduction=reduction,
        return_lse=True, process_group=pg, **kw,
    )  # fmt: skip
    full = [e.requires_grad_(), c.requires_grad_()] + ([bias.requires_grad_()] if use_bias else [])
    want_loss, want_lse = definition(
        e, c, targets, bias if use_bias else None, kw.get("ignore_index", IGNORE),
        kw.get("softcap"), reduction, kw.get("shift", 0), kw.get("label_smoothing", 0.0),
        kw.get("z_loss", 0.0),
    )  # fmt: skip
    w = torch.linspace(0.5, 1.5, want_loss.numel(), dtype=torch.float64).view(want_loss.shape)
    w_lse = torch.linspace(-0.3, 0.2, want_lse.numel(), dtype=torch.float64).view(want_lse.shape)
    ours = torch.autograd.grad((loss.double() * w).sum() + (lse.double() * w_lse).sum(), leaves)
    want = torch.autograd.grad((want_loss * w).sum() + (want_lse * w_lse).sum(), full)
    want = [want[0], *(g[lo:hi] for g in want[1:])]  # e's whole gradient, the shards' rows
    tol = TOLERANCES[dtype]
    ratios = [worst_ratio(loss, want_loss, tol, False), worst_ratio(lse, want_lse, tol, False)]
    ratios += [worst_ratio(o, g, tol, True) for o, g in zip(ours, want, strict=True)]
    # Every rank holds the same loss, to the bit.
    flat = torch.cat([loss.detach().reshape(-1), lse.detach().reshape(-1)]).double()
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size(pg))]
    dist.all_gather(gathered, flat, group=pg)
    return {
        "worst": max(ratios),
        "dtypes": (loss.dtype, lse.dtype) == (dtype, dtype),
        "same on every rank": all(torch.equal(gathered[0], g) for g in gathered),
    }


def refusal(call) -> str:
    try:
        call()
    except (TypeError, ValueError) as err:
        return f"{type(err).__name__}: {err}"
    return "no error"


def low_precision_case(pg, rank, options, autocast) -> float:
    """bfloat16 inputs (or float32 ones under bfloat16 autocast) sharded against the same call
    unsharded: the loop is the same, so only rounding differs (each rank's dE share rounded to
    bfloat16 before the sum, lse combined from the shards'). Returns the worst ratio of the
    differences to 2^-6 (of the loss, of each gradient's largest entry): a few bfloat16
    roundings."""
    kw = {k: v for k, v in options.items() if k != "bias"}
    e, c, bias, targets = inputs(options)
    dtype = torch.float32 if autocast else torch.bfloat16
    e, c, bias = e.to(dtype), c.to(dtype), bias.to(dtype) if options.get("bias") else None
    lo, hi = (0, 19) if rank == 0 else (19, VOCAB)

    def run(c, bias, **group):
        leaves = [e.detach().requires_grad_(), c.detach().requires_grad_()]
        leaves += [] if bias is None else [bias.detach().requires_grad_()]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = fg.linear_cross_entropy(
                leaves[0], leaves[1], targets, bias=leaves[2] if len(leaves) > 2 else None,
                reduction="sum", **kw, **group,
            )  # fmt: skip
        return loss.float(), torch.autograd.grad(loss, leaves)

    loss, ours = run(c[lo:hi], None if bias is None else bias[lo:hi], process_group=pg)
    want_loss, want = run(c, bias)
    want = [want[0], *(g[lo:hi] for g in want[1:])]
    tol = 2**-6
    ratios = [float((loss - want_loss).abs() / (tol * want_loss.abs()))]
    ratios += [
        float((o.float() - w.float()).abs().max() / (tol * w.float().abs().max()))
        for o, w in zip(ours, want, strict=True)
    ]
    return max(ratios)


def dtensor_case(pg) -> tuple[float, str]:
    """A DTensor classifier sharded on dim 0 (torch.chunk's uneven 19 + 18 rows) and its bias:
    the same loss and gradients as their local shards passed with the mesh's group. Returns
    the largest difference, and the refusal of a replicated DTensor classifier."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2,))
    e, c, bias, targets = inputs({"bias": True})
    kw = {"softcap": 3.0, "label_smoothing": 0.1, "return_lse": True}
    sharded = [distribute_tensor(t, mesh, [Shard(0)]).requires_grad_() for t in (c, bias)]
    leaves = [
        e.clone().requires_grad_(),
        *(t.to_local().detach().requires_grad_() for t in sharded),
    ]
    e_d = e.clone().requires_grad_()
    got = fg.linear_cross_entropy(e_d, sharded[0], targets, bias=sharded[1], **kw)
    want = fg.linear_cross_entropy(
        leaves[0], leaves[1], targets, bias=leaves[2], process_group=pg, **kw
    )
    sum(t.sum() for t in got).backward()
    sum(t.sum() for t in want).backward()
    got_grads = [e_d.grad, *(t.grad.to_local() for t in sharded)]
    pairs = list(zip(got, want, strict=True)) + list(
        zip(got_grads, [t.grad for t in leaves], strict=True)
    )
    replicated = distribute_tensor(c, mesh, [Replicate()])
    refused = refusal(lambda: fg.linear_cross_entropy(e, replicated, targets))
    return max(float((a - b).abs().max()) for a, b in pairs), refused


def bad_inputs(pg, rank) -> dict:
    """Each case is wrong on rank 1 only (or on both): every rank must raise, none may hang.
    A good call after each shows the group still in step."""
    e, c, bias, targets = inputs({})
    e, c, bias = e.float(), c.float(), bias.float()
    shard = c[:19] if rank == 0 else c[19:]

    def call(e=e, c=shard, targets=targets, **kw):
        return fg.linear_cross_entropy(e, c, targets, process_group=pg, **kw)

    other = rank == 1
    cases = {
        "label_smoothing": lambda: call(label_smoothing=0.1 if other else 0.0),
        "c": lambda: call(c=shard[:, :-1] if other else shard),
        "targets": lambda: call(targets=targets.flip(0) if other else targets),
        "bias": lambda: call(bias=bias[19:].double() if other else bias[:19]),
        "rows": lambda: call(c=shard[:0] if other else shard),
        "requires_grad": lambda: call(e=e.detach().requires_grad_(other)),
        "dtype": lambda: call(e=e.double() if other else e),
        "range": lambda: call(targets=torch.full_like(targets, VOCAB)),
        "reduction": lambda: call(reduction="max"),
    }
    out = {}
    for name, case in cases.items():
        out[name] = refusal(case)
        out[name + " then"] = float(call().detach())
    return out


def _worker(rank: int, world: int) -> dict:
    import torch.distributed as dist

    # Chunks of 16 vocabulary entries and blocks of 40 rows: every case crosses both.
    reference.CPU_MIN_CHUNK, reference.CPU_BUFFER_ELEMS = 16, 640
    pg = dist.group.WORLD
    results = {}
    for split in SPLITS:
        for dtype in TOLERANCES:
            for options in OPTIONS:
                for reduction in ("mean", "sum", "none"):
                    key = f"{split} {dtype} {options} {reduction}"
                    results[key] = one_case(pg, rank, split, dtype, options, reduction)
    module = fg.nn.LinearCrossEntropy(process_group=pg, reduction="sum")
    e, c, _, targets = inputs({})
    shard = c[:19] if rank == 0 else c[19:]
    results["module"] = float(module(e, shard, targets)) - float(
        definition(e, c, targets, None, IGNORE, None, "sum", 0, 0.0, 0.0)[0]
    )
    for autocast in (False, True):
        for options in ({}, {"bias": True, "softcap": 3.0, "label_smoothing": 0.1}):
            key = f"low precision {options} autocast={autocast}"
            results[key] = low_precision_case(pg, rank, options, autocast)
    results["dtensor"] = dtensor_case(pg)
    results["bad inputs"] = bad_inputs(pg, rank)
    return results


@pytest.fixture(scope="module")
def two_ranks() -> dict:
    return spawn(_worker, world=2)


def test_every_option_matches_the_unsharded_definition(two_ranks):
    for rank, results in two_ranks.items():
        assert isinstance(results, dict), (rank, results)
        cases = {k: v for k, v in results.items() if isinstance(v, dict) and "worst" in v}
        assert len(cases) == len(SPLITS) * len(TOLERANCES) * len(OPTIONS) * 3
        for key, case in cases.items():
            assert case["worst"] <= 1.0, (rank, key, case)
            assert case["dtypes"] and case["same on every rank"], (rank, key, case)
        assert abs(results["module"]) < 1e-4, results["module"]
        low = {k: v for k, v in results.items() if k.startswith("low precision")}
        assert len(low) == 4 and all(v <= 1.0 for v in low.values()), (rank, low)
        assert results["dtensor"][0] == 0.0, results["dtensor"]
        assert "a DTensor c must be sharded on dim 0" in results["dtensor"][1], results["dtensor"]


EXPECTED = {
    "label_smoothing": "ValueError: linear_cross_entropy: the ranks of process_group disagree "
    "on label_smoothing (rank 0: 0.0; rank 1: 0.1)",
    "c": "disagree on c ",
    "targets": "disagree on targets' values",
    "bias": "disagree on bias",
    "rows": "disagree on c has rows",
    "requires_grad": "disagree on e.requires_grad",
    "dtype": "disagree on e ",
    "range": f"ValueError: linear_cross_entropy: targets must be in [0, {VOCAB})",
    "reduction": "ValueError: linear_cross_entropy: reduction must be one of",
}


def test_bad_input_on_one_rank_raises_on_every_rank(two_ranks):
    good = {r: results["bad inputs"] for r, results in two_ranks.items()}
    for rank, out in good.items():
        for name, expected in EXPECTED.items():
            assert expected in out[name], (rank, name, out[name])
            assert out[name + " then"] == good[0][name + " then"] > 0


def test_process_group_must_be_a_process_group():
    e, c, _, targets = inputs({})
    with pytest.raises(TypeError, match="linear_cross_entropy: process_group must be a"):
        fg.linear_cross_entropy(e, c, targets, process_group="world")


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_parts_are_lse_target_logit_and_logit_sum(device, dtype, tol, softcap):
    """The op on one shard (vocabulary 10..30) against its materialized logits."""
    if device == "cuda" and dtype == torch.float32:
        tol = 1e-4  # kernels/cce.cu adds float32 in its tiles' order
    e, c, bias, targets = (t.to(device) for t in inputs({}))
    e, targets = e.reshape(-1, DIM), targets.reshape(-1)
    local = torch.where((targets >= 10) & (targets < 30), targets - 10, -1)
    shard, b = c[10:30], bias[10:30]
    z = e @ shard.T + b
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    op = parallel.linear_cross_entropy_parts_op
    args = (e.to(dtype), shard.to(dtype), b.to(dtype), local, softcap)
    lse, target_logit, logit_sum = op(*args, True)
    kw = {"rtol": tol, "atol": tol}
    torch.testing.assert_close(lse.double(), torch.logsumexp(z, 1), **kw)
    mine = local >= 0
    picked = z.gather(1, local.clamp(min=0)[:, None])[:, 0]
    torch.testing.assert_close(target_logit.double(), torch.where(mine, picked, 0.0), **kw)
    torch.testing.assert_close(logit_sum.double(), z.sum(1), **kw)
    assert op(*args, False)[2].numel() == 0


@pytest.mark.parametrize("want_sum", [True, False])
def test_parts_opcheck(want_sum):
    e, c, bias, targets = inputs({})
    e, targets = e.reshape(-1, DIM).float(), targets.reshape(-1)
    local = torch.where(targets < 20, targets, -1)
    args = (e, c[:20].float(), bias[:20].float(), local, 2.0, want_sum)
    torch.library.opcheck(parallel.linear_cross_entropy_parts_op, args)
