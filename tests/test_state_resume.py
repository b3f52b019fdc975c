"""State round trips through torch.save / torch.load(weights_only=True): SPAM and StableSPAM
resume bit-exactly at every save point of several configurations (dense and sparse, resets,
warm-ups and clip warm-ups crossed, two param groups); packed W4 weights (W4A16Linear's buffers
and W4Weights, both layouts, both scale storages, with and without zero points), quantized
tensors and packed batches load back bit for bit; a W4Weight whose saved fields disagree is
refused on load. ByteStream's save points: tests/test_bytestream.py."""

from __future__ import annotations

import dataclasses
import io
import pickle

import pytest
import torch
from torch import nn

import ferrograd as fg

SHAPES = ((6, 5), (5,), (3, 2, 4))
STEPS = 10


def through_torch_save(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def gradients(seed: int) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    steps = [[torch.randn(s, generator=g) * 0.1 for s in SHAPES] for _ in range(STEPS)]
    steps[6][0][1, 2] = 40.0  # a spike for the clipping
    return steps


OPTIMIZERS = [
    (fg.optim.SPAM, {"reset_interval": 4, "warmup_steps": 2, "clip_warmup": 1}),
    (fg.optim.SPAM, {"density": 0.5, "reset_interval": 3, "threshold": 2.0, "clip_warmup": 2}),
    (fg.optim.StableSPAM, {"reset_interval": 4, "total_steps": 9, "weight_decay": 0.1}),
    (fg.optim.StableSPAM, {"density": 0.4, "reset_interval": 3, "gamma3": 0.9}),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cls, options", OPTIMIZERS)
def test_optimizer_resumes_bit_exactly_at_every_save_point(cls, options, dtype):
    grads = [[g.to(dtype) for g in gs] for gs in gradients(seed=len(options))]

    def fresh():
        torch.manual_seed(0)
        params = [nn.Parameter(torch.randn(s, dtype=dtype)) for s in SHAPES]
        groups = [{"params": params[:2]}, {"params": params[2:], "lr": 5e-3}]
        return params, cls(groups, lr=1e-2, seed=11, **options)

    def run(params, opt, steps):
        for gs in steps:
            for p, g in zip(params, gs, strict=True):
                p.grad = g.clone()
            opt.step()

    params, opt = fresh()
    run(params, opt, grads)
    want_state = opt.state_dict()
    for save in range(STEPS + 1):
        first, opt1 = fresh()
        run(first, opt1, grads[:save])
        saved = through_torch_save(
            {"optimizer": opt1.state_dict(), "params": [p.detach() for p in first]}
        )
        resumed, opt2 = fresh()
        with torch.no_grad():
            for p, s in zip(resumed, saved["params"], strict=True):
                p.copy_(s)
        opt2.load_state_dict(saved["optimizer"])
        run(resumed, opt2, grads[save:])
        for a, b in zip(params, resumed, strict=True):
            assert torch.equal(a, b), f"parameters differ after resuming at step {save}"
        got_state = opt2.state_dict()
        assert got_state["state"].keys() == want_state["state"].keys()
        for key, entries in want_state["state"].items():
            for name, value in entries.items():
                other = got_state["state"][key][name]
                same = torch.equal(value, other) if isinstance(value, torch.Tensor) else (
                    value == other)  # fmt: skip
                assert same, f"state[{key}][{name!r}] differs after resuming at step {save}"


def _weight(dtype: torch.dtype, magnitude: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return (torch.randn(12, 100, generator=g) * magnitude).to(dtype)


W4_CASES = [
    (128, True, torch.float32, 1.0),  # float16 scales, one short group
    (32, False, torch.float32, 1.0),  # symmetric
    (-1, True, torch.bfloat16, 1.0),  # bfloat16 scales, whole rows
    (32, True, torch.float32, 1e6),  # float32 scales (beyond float16's range)
    (7, False, torch.float16, 1e-6),  # float32 scales (below float16's normal range)
]


@pytest.mark.parametrize("group_size, zero_point, dtype, magnitude", W4_CASES)
def test_w4a16_linear_state_loads_back_bit_for_bit(group_size, zero_point, dtype, magnitude):
    q = fg.quant.quantize_w4(_weight(dtype, magnitude), group_size, zero_point)
    bias = torch.randn(12).to(dtype)
    layer = fg.nn.W4A16Linear(q, bias)
    saved = through_torch_save(layer.state_dict())
    other = fg.quant.quantize_w4(_weight(dtype, 1.0).flip(0), group_size, zero_point)
    fresh = fg.nn.W4A16Linear(other, torch.zeros(12, dtype=dtype))
    fresh.load_state_dict(saved)
    for name, value in layer.state_dict().items():
        got = fresh.state_dict()[name]
        assert got is None if value is None else (
            got.dtype == value.dtype and torch.equal(got, value)), name  # fmt: skip
    x = torch.randn(3, 100).to(dtype)
    assert torch.equal(fresh(x), layer(x))
    assert torch.equal(fresh.weight.dequantize(), q.dequantize())


@pytest.mark.parametrize("layout", ["cpu_blocks", "gpu_words"])
@pytest.mark.parametrize("group_size, zero_point, dtype, magnitude", W4_CASES)
def test_w4_weight_fields_round_trip(layout, group_size, zero_point, dtype, magnitude):
    """A W4Weight saved as its fields (tensors, ints, a dtype, a string) is rebuilt exactly."""
    q = fg.quant.quantize_w4(_weight(dtype, magnitude), group_size, zero_point)
    q = q.with_layout(layout)
    fields = {
        "packed": q.packed,
        "scales": q.scales,
        "zeros": q.zeros,
        "shape": list(q.shape),
        "group_size": q.group_size,
        "dtype": q.dtype,
        "layout": q.layout,
    }
    back = fg.quant.W4Weight(**through_torch_save(fields))
    assert back.scales.dtype == q.scales.dtype and torch.equal(back.packed, q.packed)
    assert torch.equal(back.dequantize(), q.dequantize())


@pytest.mark.parametrize("layout", ["cpu_blocks", "gpu_words"])
@pytest.mark.parametrize("group_size, zero_point, dtype, magnitude", W4_CASES)
def test_w4_weight_loads_with_weights_only(layout, group_size, zero_point, dtype, magnitude):
    """torch.load's default (weights_only=True) rebuilds a saved W4Weight, alone or in a dict."""
    q = fg.quant.quantize_w4(_weight(dtype, magnitude), group_size, zero_point)
    q = q.with_layout(layout)
    back = through_torch_save({"w": q})["w"]
    assert isinstance(back, fg.quant.W4Weight)
    for f in dataclasses.fields(q):
        a, b = getattr(q, f.name), getattr(back, f.name)
        same = torch.equal(a, b) and a.dtype == b.dtype if isinstance(a, torch.Tensor) else a == b
        assert same, f.name
    assert torch.equal(back.dequantize(), q.dequantize())


def test_a_w4_weight_with_inconsistent_fields_is_refused_on_load():
    q = fg.quant.quantize_w4(_weight(torch.float32, 1.0), 32)
    object.__setattr__(q, "packed", q.packed[:5])  # as a damaged or hand-edited file would hold
    buf = io.BytesIO()
    torch.save(q, buf)
    for weights_only in (True, False):
        buf.seek(0)
        with pytest.raises((ValueError, pickle.UnpicklingError), match="W4Weight: packed must"):
            torch.load(buf, weights_only=weights_only)


def test_quantized_tensors_and_packed_batches_load_with_weights_only():
    x = torch.randn(6, 70)
    q = fg.shiftquant(x, bits=6, group_size=32)
    batch = fg.data.pack_documents(["first document", b"second", "third one here"], 16)
    back_q, back_batch = through_torch_save([q, batch])
    assert isinstance(back_q, fg.ShiftQuantTensor) and (back_q.bits, back_q.group_size) == (6, 32)
    for name in ("codes", "scale", "shifts"):
        assert torch.equal(getattr(back_q, name), getattr(q, name)), name
    assert torch.equal(back_q.dequantize(), q.dequantize())
    assert isinstance(back_batch, fg.data.PackedBatch)
    assert back_batch.max_seqlen == batch.max_seqlen
    for name in ("input_ids", "targets", "position_ids", "document_ids", "cu_seqlens"):
        assert torch.equal(getattr(back_batch, name), getattr(batch, name)), name
