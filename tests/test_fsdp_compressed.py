"""FSDP2 all-gathering ShiftQuantLinear weights as ShiftQuant codes (fg.nn.compress_all_gather)
on two gloo processes, against the same FSDP2 run all-gathering float32: bytes on the wire,
the first step's loss (the forward sees the same codes) and the loss after training; and
ShiftQuantLinear's weight-codes cache under FSDP2 around a reload."""

from __future__ import annotations

import pytest
import torch
from support.distributed import fsdp2_on_cpu, spawn
from torch import nn

import ferrograd as fg
from ferrograd.nn.fsdp import ShiftQuantWeight, all_gather_bytes

WORLD, STEPS, ROWS = 2, 30, 64
WIDTHS = (64, 128, 128, 64)


def build() -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for n_in, n_out in zip(WIDTHS, WIDTHS[1:], strict=False):
        layers += [fg.nn.ShiftQuantLinear(n_in, n_out, bias=False), nn.GELU()]
    return nn.Sequential(*layers[:-1])


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs of the step and their targets under a fixed random map (learnable)."""
    g = torch.Generator().manual_seed(step)
    x = torch.randn(ROWS, WIDTHS[0], generator=g)
    w = torch.randn(WIDTHS[0], WIDTHS[-1], generator=torch.Generator().manual_seed(99))
    return x, torch.tanh(x @ w / WIDTHS[0] ** 0.5)


def _worker(rank: int, world: int) -> dict:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    out = {}
    for compressed in (False, True):
        model = build()
        if compressed:
            fg.nn.compress_all_gather(model)
        mesh = init_device_mesh("cpu", (world,))
        for layer in model:
            if isinstance(layer, fg.nn.ShiftQuantLinear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        losses = []
        rows = slice(rank * ROWS // world, (rank + 1) * ROWS // world)
        with all_gather_bytes() as sent:
            for step in range(STEPS):
                x, y = batch(step)
                torch.manual_seed(1000 * step + rank)  # the gradients' stochastic rounding
                loss = nn.functional.mse_loss(model(x[rows]), y[rows])
                opt.zero_grad()
                loss.backward()
                opt.step()
                mean = loss.detach().clone()
                dist.all_reduce(mean)
                losses.append(float(mean) / world)
        out[compressed] = (losses, sent.bytes / STEPS)
    return out


@pytest.fixture(scope="module")
def runs() -> dict:
    return spawn(_worker, world=WORLD)


@fsdp2_on_cpu
def test_codes_on_the_wire_train_like_floats(runs):
    for rank, out in runs.items():
        assert isinstance(out, dict), (rank, out)
        (plain, plain_bytes), (ours, ours_bytes) = out[False], out[True]
        # per row: K code bytes + a float32 scale + a shift per 64 (K = 64 or 128) vs 4 K bytes
        assert ours_bytes <= 0.3 * plain_bytes, (ours_bytes, plain_bytes)
        assert ours[0] == pytest.approx(plain[0], rel=1e-5)  # the same forward codes
        assert ours[-1] == pytest.approx(plain[-1], rel=0.01), (ours, plain)
        assert plain[-1] < 0.8 * plain[0]  # it trains


def test_compress_all_gather_wraps_only_shiftquant_weights_and_refuses_other_models():
    model = nn.Sequential(fg.nn.ShiftQuantLinear(8, 4, bits=6, group_size=32), nn.Linear(4, 2))
    assert fg.nn.compress_all_gather(model) is model
    w = model[0].weight
    assert isinstance(w.data, ShiftQuantWeight) and (w.data.bits, w.data.group_size) == (6, 32)
    assert type(model[1].weight.data) is torch.Tensor
    y = model(torch.randn(3, 8))  # unsharded, the wrapped weight still works
    y.sum().backward()
    assert w.grad is not None and w.grad.shape == (4, 8)
    with pytest.raises(ValueError, match="compress_all_gather: model holds no ShiftQuantLinear"):
        fg.nn.compress_all_gather(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="compress_all_gather: model must be an nn.Module"):
        fg.nn.compress_all_gather("model")


def _reload_worker(rank: int, world: int) -> dict:
    """No-grad forwards of large ShiftQuantLinears under fully_shard around a load_state_dict
    of other weights: FSDP2 gathers the new weights into memory that is often at the old
    address, with the old version counter (the codes cached by the first forward must not be
    served to the second)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    out = {}
    for cache in (None, True):
        torch.manual_seed(0)
        shapes = [(2048, 4096), (4096, 2048)]  # 32 MiB weights: the allocator maps them
        layers = [fg.nn.ShiftQuantLinear(*s, cache_weight_codes=cache) for s in shapes]
        model = nn.Sequential(layers[0], nn.GELU(), layers[1])
        mesh = init_device_mesh("cpu", (world,))
        for layer in layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        x = torch.randn(4, 2048)
        other = {k: (v * -1).detach() for k, v in model.state_dict().items()}
        with torch.no_grad():
            model(x)
            model.load_state_dict(other)
            got = model(x)
        plain = nn.Sequential(*(fg.nn.ShiftQuantLinear(*s) for s in shapes[:1]), nn.GELU(),
                              *(fg.nn.ShiftQuantLinear(*s) for s in shapes[1:]))  # fmt: skip
        plain.load_state_dict({k: v.full_tensor() for k, v in other.items()})
        with torch.no_grad():
            out[cache] = float((got - plain(x)).abs().max())
    return out


@fsdp2_on_cpu
def test_evaluation_after_a_reload_sees_the_new_weights():
    for rank, out in spawn(_reload_worker, world=WORLD).items():
        assert out == {None: 0.0, True: 0.0}, (rank, out)
