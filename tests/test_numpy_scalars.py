"""Scalar options given as numpy scalars (a sweep over ``np.logspace`` learning rates, a
``seq_len`` from ``np.arange``), as torch's own modules and optimizers take them: every public
entry point gives the same results as with the equal Python int / float, and stores Python
values (``layer.bits`` is an int, a param group's lr a float)."""

from __future__ import annotations

import pytest
import torch

import ferrograd as fg
from ferrograd.integrations import transformers as fgt

np = pytest.importorskip("numpy")

i64, f32 = np.int64, np.float32


def py(v: float) -> float:
    """The Python float equal to a float32 scalar (what the numpy call must match)."""
    return float(f32(v))


def test_op_options():
    torch.manual_seed(0)
    x = torch.randn(6, 96)
    a = fg.shiftquant(x, bits=i64(6), group_size=i64(32), rounding="stochastic", seed=i64(3))
    b = fg.shiftquant(x, bits=6, group_size=32, rounding="stochastic", seed=3)
    assert torch.equal(a.codes, b.codes) and type(a.bits) is int and type(a.group_size) is int
    assert torch.equal(fg.softmax(x, dim=i64(0)), fg.softmax(x, dim=0))

    e, c = torch.randn(2, 9, 16), torch.randn(40, 16)
    t = torch.randint(0, 40, (2, 9))
    t[0, 3] = 7
    opts = dict(softcap=30.0, label_smoothing=0.1, z_loss=1e-4, filter_eps=1e-3)
    want = fg.linear_cross_entropy(e, c, t, ignore_index=7, shift=1, **{
        k: py(v) for k, v in opts.items()
    })  # fmt: skip
    got = fg.linear_cross_entropy(e, c, t, ignore_index=i64(7), shift=i64(1), **{
        k: f32(v) for k, v in opts.items()
    })  # fmt: skip
    assert torch.equal(got, want)

    w = torch.randn(24, 64)
    w4 = fg.quant.quantize_w4(w, group_size=i64(32))
    assert type(w4.group_size) is int
    assert torch.equal(w4.dequantize(), fg.quant.quantize_w4(w, group_size=32).dequantize())


def test_module_options():
    torch.manual_seed(0)
    x = torch.randn(5, 64)
    layer = fg.nn.ShiftQuantLinear(
        i64(64), i64(32), bits=i64(6), grad_bits=i64(4), group_size=i64(32)
    )
    assert (layer.in_features, layer.bits, layer.grad_bits, layer.group_size) == (64, 6, 4, 32)
    assert all(type(v) is int for v in (layer.in_features, layer.bits, layer.grad_bits))
    twin = fg.nn.ShiftQuantLinear(64, 32, bits=6, grad_bits=4, group_size=32)
    twin.load_state_dict(layer.state_dict())
    assert torch.equal(layer(x), twin(x))

    for got, want in [
        (fg.nn.L1LayerNorm(i64(64), eps=f32(1e-5), bits=i64(6)),
         fg.nn.L1LayerNorm(64, eps=py(1e-5), bits=6)),
        (fg.nn.L1RMSNorm(i64(64), eps=f32(1e-6)), fg.nn.L1RMSNorm(64, eps=py(1e-6))),
    ]:  # fmt: skip
        assert type(got.eps) is float and got.eps == want.eps
        assert torch.equal(got(x), want(x))

    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.LayerNorm(32))
    fg.nn.quantize_model(model, bits=i64(6), grad_bits=i64(5), group_size=i64(16))
    assert (model[0].bits, model[0].grad_bits, model[0].group_size) == (6, 5, 16)
    assert type(model[0].bits) is int
    w4 = fg.nn.W4A16Linear.from_linear(torch.nn.Linear(64, 8), group_size=i64(32))
    assert w4.weight.group_size == 32 and type(w4.weight.group_size) is int


def _train(make, steps: int = 6) -> list[torch.Tensor]:
    torch.manual_seed(0)
    params = [torch.randn(12, 10, requires_grad=True), torch.randn(10, requires_grad=True)]
    opt = make(params)
    for _ in range(steps):
        loss = sum((p**3).sum() for p in params)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return [p.detach() for p in params]


@pytest.mark.parametrize(
    ("cls", "floats", "ints"),
    [
        (fg.optim.SPAM, dict(lr=1e-2, eps=1e-6, weight_decay=0.1, density=0.5, threshold=50.0),
         dict(reset_interval=4, warmup_steps=2, clip_warmup=1, seed=5)),
        (fg.optim.StableSPAM, dict(lr=1e-2, eps=1e-8, weight_decay=0.1, gamma1=0.7, gamma2=0.9,
                                   gamma3=0.999, eta_min=0.5, density=0.5),
         dict(reset_interval=4, total_steps=10, seed=5)),
    ],
)  # fmt: skip
def test_optimizer_options(cls, floats, ints):
    betas = (0.9, 0.99)
    want = _train(lambda ps: cls(
        ps, betas=tuple(py(b) for b in betas), **{k: py(v) for k, v in floats.items()}, **ints
    ))  # fmt: skip
    made = []

    def numpy_options(ps):
        made.append(cls(
            ps, betas=tuple(f32(b) for b in betas), **{k: f32(v) for k, v in floats.items()},
            **{k: i64(v) for k, v in ints.items()},
        ))  # fmt: skip
        return made[0]

    got = _train(numpy_options)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)
    group = made[0].param_groups[0]
    assert type(group["lr"]) is float and all(type(b) is float for b in group["betas"])
    assert type(group["reset_interval"]) is int


def test_data_options():
    docs = ["hello world", "ferrograd", "a longer document than the others here"]
    a = fg.data.pack_documents(docs, i64(16), batch_size=i64(6), offset=i64(5), seed=i64(1))
    b = fg.data.pack_documents(docs, 16, batch_size=6, offset=5, seed=1)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.targets, b.targets)
    assert fg.data.decode_bytes(a.input_ids[0], offset=i64(5)) == fg.data.decode_bytes(
        b.input_ids[0], offset=5
    )
    got = next(iter(fg.data.ByteStream(docs, i64(8), i64(2), seed=i64(3))))
    want = next(iter(fg.data.ByteStream(docs, 8, 2, seed=3)))
    assert torch.equal(got.input_ids, want.input_ids)
    collate = fg.data.PackingCollator(i64(32))
    features = [{"input_ids": [5, 6, 7]}, {"input_ids": [8, 9]}]
    want = fg.data.PackingCollator(32)(features)
    got = collate(features)
    assert got.keys() == want.keys()
    for key, value in got.items():
        assert torch.equal(value, want[key]) if torch.is_tensor(value) else value == want[key]


def test_transformers_and_threads():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2,
    )  # fmt: skip
    model = fgt.apply(
        transformers.LlamaForCausalLM(config), shiftquant_bits=i64(6), grad_bits=i64(5),
        group_size=i64(16),
    )  # fmt: skip
    layer = model.model.layers[0].mlp.up_proj
    assert (layer.bits, layer.grad_bits, layer.group_size) == (6, 5, 16)
    assert type(layer.bits) is int

    before = fg.get_num_threads()
    try:
        fg.set_num_threads(i64(1))
        assert fg.get_num_threads() == 1
    finally:
        fg.set_num_threads(None)
    assert fg.get_num_threads() == before
