"""A whole model on two gloo processes: a tiny transformers Llama patched by
``ferrograd.integrations.transformers.apply(model, shiftquant_bits=8, l1_norm=True)`` (ShiftQuant
linears with stochastic gradient rounding, L1 RMS norms, the cut cross-entropy loss), trained with
fg.optim.SPAM under FSDP2 (fully_shard per decoder layer) and under DDP, each rank on its half of
a fixed global batch, against one process on the same global batch: the loss of every step and
the final parameters."""

from __future__ import annotations

import pytest
import torch
from support.distributed import FSDP2_ON_CPU, fsdp2_on_cpu, spawn

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (make test installs it)"
)

import ferrograd as fg  # noqa: E402
from ferrograd.integrations import transformers as fgt  # noqa: E402

WORLD, STEPS, ROWS, SEQ = 2, 4, 4, 32
MODES = ("fsdp2", "ddp") if FSDP2_ON_CPU else ("ddp",)  # what the worker runs


def build():
    config = transformers.LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
        pad_token_id=0, tie_word_embeddings=False,
    )  # fmt: skip
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    return fgt.apply(model, shiftquant_bits=8, l1_norm=True)


def optimizer(params):
    return fg.optim.SPAM(params, lr=1e-2, warmup_steps=1)


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ROWS packed rows of byte ids (labels -100 on each piece's first token and on padding)."""
    docs = [f"{step}:{i} the " + "ab" * (i % 4) for i in range(2 * ROWS)]
    batch = fg.data.pack_documents(docs, SEQ, batch_size=ROWS, seed=step).to_hf()
    return batch["input_ids"], batch["labels"]


def rank_loss(model, step: int, rank: int) -> torch.Tensor:
    """The loss of ``rank``'s rows of the step's global batch; the stochastic rounding of the
    gradients draws its seeds from torch's generator, seeded per (step, rank)."""
    ids, labels = global_batch(step)
    rows = slice(rank * ROWS // WORLD, (rank + 1) * ROWS // WORLD)
    torch.manual_seed(1000 * step + rank)
    return model(input_ids=ids[rows], labels=labels[rows]).loss


def _worker(rank: int, world: int) -> dict:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    out = {}
    for mode in MODES:
        model = build()
        if mode == "fsdp2":
            mesh = init_device_mesh("cpu", (world,))
            for layer in model.model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
            wrapped = model
        else:
            wrapped = DistributedDataParallel(model)
        opt = optimizer(wrapped.parameters())
        losses = []
        for step in range(STEPS):
            opt.zero_grad()
            loss = rank_loss(wrapped, step, rank)
            loss.backward()  # FSDP2 and DDP average the ranks' gradients
            opt.step()
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            losses.append(float(mean) / world)
        params = {
            name: (p.full_tensor() if mode == "fsdp2" else p).detach().numpy().copy()
            for name, p in model.named_parameters()
        }
        out[mode] = (losses, params)
    return out


def one_process() -> tuple[list[float], dict]:
    """The same steps in this process: each rank's rows in turn, their losses / WORLD
    accumulated (the average FSDP2 and DDP take), then one optimizer step. (One forward over
    all rows would round the gradients otherwise: their ShiftQuant groups run along the
    tokens.)"""
    torch.set_num_threads(1)  # as the spawned ranks run (support/distributed.py)
    model = build()
    opt = optimizer(model.parameters())
    losses = []
    for step in range(STEPS):
        opt.zero_grad()
        total = 0.0
        for rank in range(WORLD):
            loss = rank_loss(model, step, rank) / WORLD
            loss.backward()
            total += float(loss.detach())
        opt.step()
        losses.append(total)
    return losses, {name: p.detach().clone() for name, p in model.named_parameters()}


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("mode", [pytest.param("fsdp2", marks=fsdp2_on_cpu), "ddp"])
def test_two_processes_train_like_one(two_process_runs, one_process_run, mode):
    want_losses, want_params = one_process_run
    for rank, out in two_process_runs.items():
        assert isinstance(out, dict), (rank, out)
        losses, params = out[mode]
        for step, (got, want) in enumerate(zip(losses, want_losses, strict=True)):
            assert abs(got - want) <= 1e-5 * abs(want), (rank, step, got, want)
        assert params.keys() == want_params.keys()
        for name, want in want_params.items():
            assert _relative(torch.from_numpy(params[name]), want) < 1e-5, (rank, name)
    assert want_losses[-1] < want_losses[0]  # it trains


@pytest.fixture(scope="module")
def two_process_runs() -> dict:
    return spawn(_worker, world=WORLD)


@pytest.fixture(scope="module")
def one_process_run() -> tuple[list[float], dict]:
    threads = torch.get_num_threads()
    try:
        return one_process()
    finally:
        torch.set_num_threads(threads)
