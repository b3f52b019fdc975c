"""A small language model holding every ferrograd module and op, run the ways users run models:
eager, torch.compile(fullgraph=True), torch.export, and sharded with FSDP2 over two processes."""

from __future__ import annotations

import math

import pytest
import torch
from support.distributed import fsdp2_on_cpu, spawn
from torch import nn

import ferrograd as fg

VOCAB, DIM, SEQ = 96, 64, 12


class TinyLM(nn.Module):
    """Embedding -> L1 norm -> ShiftQuant attention (fg.softmax) -> L1 norm on codes -> frozen
    W4A16 projection -> fg.log_softmax mixing -> the tied head's loss by linear_cross_entropy."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.norm1 = fg.nn.L1LayerNorm(DIM)
        self.qkv = fg.nn.ShiftQuantLinear(DIM, 3 * DIM, bits=8)
        self.proj = fg.nn.ShiftQuantLinear(DIM, DIM, bits=6, grad_bits=8)
        self.norm2 = fg.nn.L1LayerNorm(DIM, bits=8)
        self.frozen = fg.nn.W4A16Linear.from_linear(nn.Linear(DIM, DIM), group_size=32)

    def forward(self, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        q, k, v = self.qkv(self.norm1(h)).chunk(3, dim=-1)
        causal = torch.full((ids.shape[-1],) * 2, -math.inf).triu(1)
        att = fg.softmax(q @ k.transpose(-1, -2) / math.sqrt(DIM) + causal, dim=-1)
        h = h + self.proj(att @ v)
        h = h + self.frozen(self.norm2(h))
        h = h + 0.1 * fg.log_softmax(h, dim=-1, dtype=torch.float32)
        return fg.linear_cross_entropy(h, self.emb.weight, targets, shift=1)


def _batch(seed: int, batch: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (batch, SEQ), generator=torch.Generator().manual_seed(seed))
    return ids, ids.clone()


def _loss_and_grads(model: nn.Module, ids, targets, seed: int):
    model.zero_grad()
    torch.manual_seed(seed)  # the gradients' stochastic rounding draws its seeds from here
    loss = model(ids, targets)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def test_eager_model_trains():
    torch.manual_seed(0)
    model = TinyLM()
    opt = fg.optim.SPAM(model.parameters(), lr=3e-3, warmup_steps=1)
    ids, targets = _batch(1)
    first = None
    for step in range(30):
        loss, _ = _loss_and_grads(model, ids, targets, step)
        first = loss if first is None else first
        opt.step()
    assert loss < 0.8 * first


def test_compiled_model_matches_eager():
    """Every ferrograd op in one fullgraph compile: any graph break fails the test."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TinyLM()
    compiled = torch.compile(model, fullgraph=True)
    names = [name for name, _ in model.named_parameters()]
    # RNG calls run as in eager, so the stochastic rounding seeds are the same draws.
    with torch._inductor.config.patch(fallback_random=True):
        for seed in (2, 3):  # the second call runs the cached graph
            ids, targets = _batch(seed)
            loss_e, grads_e = _loss_and_grads(model, ids, targets, seed)
            loss_c, grads_c = _loss_and_grads(compiled, ids, targets, seed)
            torch.testing.assert_close(loss_c, loss_e, rtol=1e-4, atol=1e-5)
            for name, got, want in zip(names, grads_c, grads_e, strict=True):
                # A rounding difference upstream may move a ShiftQuant code by one step (1/127
                # of a row's range); anything structural would be off by far more.
                assert _relative(got, want) < 2e-2, name


def test_exported_model_matches_eager():
    torch.manual_seed(0)
    model = TinyLM()
    ids, targets = _batch(4)
    program = torch.export.export(model, (ids, targets))
    called = {n.target for n in program.graph.nodes if n.op == "call_function"}
    ours = {str(t) for t in called if str(t).startswith("ferrograd.")}
    for op in ("softmax", "shiftquant_linear", "linear_cross_entropy"):
        assert any(op in name for name in ours), (op, ours)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(ids, targets), model(ids, targets))


def test_shiftquant_matmul_compiles():
    x, w = torch.randn(5, 64), torch.randn(7, 64)

    def product(x, w):
        return fg.shiftquant_matmul(fg.shiftquant(x, bits=6), fg.shiftquant(w, bits=6))

    torch._dynamo.reset()
    compiled = torch.compile(product, fullgraph=True)
    torch.testing.assert_close(compiled(x, w), product(x, w))


def _fsdp2_worker(rank: int, world: int) -> float:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    sharded = TinyLM()
    torch.manual_seed(0)
    plain = TinyLM()
    for layer in (sharded.norm1, sharded.qkv, sharded.proj, sharded.norm2):
        fully_shard(layer, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    opt = fg.optim.SPAM(sharded.parameters(), lr=1e-2, warmup_steps=1)
    ref = fg.optim.SPAM(plain.parameters(), lr=1e-2, warmup_steps=1)
    for step in range(4):
        batches = [_batch(100 * step + r, batch=2) for r in range(world)]
        opt.zero_grad()
        torch.manual_seed(1000 * step + rank)
        sharded(*batches[rank]).backward()
        opt.step()
        ref.zero_grad()
        for r, batch in enumerate(batches):
            # FSDP averages the ranks' gradients: the mean of the per-rank losses, each
            # backward seeded as that rank's was.
            torch.manual_seed(1000 * step + r)
            (plain(*batch) / world).backward()
        ref.step()
    worst = max(
        _relative(p.full_tensor(), q.detach())
        for p, q in zip(sharded.parameters(), plain.parameters(), strict=True)
    )
    return worst


@fsdp2_on_cpu
def test_fsdp2_training_matches_one_process():
    """FSDP2 frees and re-gathers parameters by resizing their storage: the kernels must borrow
    tensor memory without pinning it. Two ranks train like one process on the whole batch."""
    results = spawn(_fsdp2_worker, world=2)
    for rank, worst in results.items():
        assert isinstance(worst, float), (rank, worst)
        assert worst < 1e-5, (rank, worst)


@pytest.mark.parametrize(
    "module",
    [
        lambda: fg.nn.ShiftQuantLinear(DIM, DIM),
        lambda: fg.nn.L1LayerNorm(DIM),
        lambda: fg.nn.L1LayerNorm(DIM, bits=8),
    ],
)
def test_modules_leave_parameter_storage_resizable(module):
    """What FSDP2 does to a parameter between steps, after a forward and backward."""
    layer = module()
    layer(torch.randn(4, DIM)).square().sum().backward()
    for p in layer.parameters():
        storage = p.data.untyped_storage()
        size = storage.nbytes()
        storage.resize_(0)
        storage.resize_(size)
