"""ShiftQuant against a plain float64 torch implementation of DESIGN.md section 5."""

from __future__ import annotations

import math

import pytest
import torch

import ferrograd as fg
from ferrograd.ops.shiftquant import quantize_2d

pytestmark = pytest.mark.simd


def reference(x: torch.Tensor, bits: int, group_size: int):
    """codes, scale, shifts of the definition, computed in float64 from x's float32 values."""
    x = x.float().double()
    qmax = 2 ** (bits - 1) - 1
    k_len = x.shape[-1]
    pad = (-k_len) % group_size
    r = x.abs().amax(-1, keepdim=True)
    scale = (r / qmax).float()
    groups = torch.nn.functional.pad(x.abs(), (0, pad)).unflatten(-1, (-1, group_size))
    m = groups.amax(-1)
    shifts = torch.where(
        m > 0, torch.floor(torch.log2(r / m)).clamp(0, 15), torch.full_like(m, 15.0)
    )
    step_pow = torch.repeat_interleave(2.0**shifts, group_size, dim=-1)[..., :k_len]
    safe = torch.where(scale > 0, scale.double(), torch.ones_like(r))
    codes = torch.round(x * step_pow / safe).clamp(-qmax, qmax)
    codes = torch.where(scale > 0, codes, torch.zeros_like(codes))
    return codes.to(torch.int8), scale.squeeze(-1), shifts.to(torch.uint8)


def dequantized(q) -> torch.Tensor:
    """codes * scale * 2^-shift in float64, written out independently of the kernel."""
    k_len = q.codes.shape[-1]
    pw = torch.repeat_interleave(2.0 ** -q.shifts.double(), q.group_size, dim=-1)[..., :k_len]
    return q.codes.double() * q.scale.double().unsqueeze(-1) * pw


def sample(shape, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    # Groups of very different magnitudes make the shifts matter.
    return x * torch.logspace(-3, 1, shape[-1]).roll(seed)[torch.randperm(shape[-1], generator=g)]


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize(("group_size", "k"), [(64, 256), (4, 7), (32, 100), (128, 1000)])
def test_codes_scales_shifts_match_the_definition(bits, group_size, k):
    x = sample((9, k), seed=bits)
    x[3] = 0.0  # a zero row
    q = fg.shiftquant(x, bits=bits, group_size=group_size)
    codes, scale, shifts = reference(x, bits, group_size)
    torch.testing.assert_close(q.scale, scale, rtol=0, atol=0)
    assert torch.equal(q.shifts, shifts)
    assert torch.equal(q.codes, codes)
    assert q.bits == bits and q.group_size == group_size


@pytest.mark.parametrize("magnitude", [1e-30, 1e30, 3e38, 1e-3])
def test_huge_and_tiny_magnitudes(magnitude):
    x = sample((4, 192), seed=1)
    x = x / x.abs().max() * magnitude
    q = fg.shiftquant(x, bits=8)
    codes, scale, shifts = reference(x, 8, 64)
    assert torch.equal(q.codes, codes) and torch.equal(q.shifts, shifts)
    assert torch.isfinite(q.dequantize()).all()


@pytest.mark.parametrize("bits", [2, 4, 6, 8])
def test_dequantization_error_is_at_most_half_a_step(bits):
    x = sample((16, 300), seed=bits)
    q = fg.shiftquant(x, bits=bits, group_size=32)
    step = torch.repeat_interleave(2.0 ** -q.shifts.double(), 32, dim=-1)[..., :300]
    step = step * q.scale.double().unsqueeze(-1)
    err = (q.dequantize().double() - x.double()).abs()
    assert (err <= 0.5 * step * (1 + 1e-6)).all()
    torch.testing.assert_close(q.dequantize().double(), dequantized(q))


def test_any_leading_shape_and_low_precision_inputs():
    x = sample((2, 3, 5, 70), seed=4)
    q = fg.shiftquant(x.bfloat16(), bits=6, group_size=16)
    assert q.codes.shape == x.shape and q.scale.shape == (2, 3, 5) and q.shifts.shape[-1] == 5
    ref = fg.shiftquant(x.bfloat16().float(), bits=6, group_size=16)
    assert torch.equal(q.codes, ref.codes)


def test_stochastic_rounding_is_unbiased_and_seeded():
    x = torch.full((1, 64), 0.3) + torch.linspace(0, 0.01, 64)
    x[0, 0] = 1.0  # the row max: step 1/7 at 4 bits
    a = fg.shiftquant(x, bits=4, rounding="stochastic", seed=5)
    assert torch.equal(a.codes, fg.shiftquant(x, bits=4, rounding="stochastic", seed=5).codes)
    mean = torch.stack(
        [fg.shiftquant(x, 4, rounding="stochastic", seed=s).dequantize() for s in range(2000)]
    ).mean(0)
    # The standard error of a mean of 2000 draws is below 0.5 step / sqrt(2000) = 1.6e-3.
    assert (mean - x).abs().max() < 6e-3
    nearest = fg.shiftquant(x, 4).dequantize()
    assert (nearest - x).abs().mean() > 4 * (mean - x).abs().mean()


def test_stochastic_seed_none_follows_torch_manual_seed():
    x = sample((3, 64))
    torch.manual_seed(0)
    a = fg.shiftquant(x, 3, rounding="stochastic")
    torch.manual_seed(0)
    b = fg.shiftquant(x, 3, rounding="stochastic")
    assert torch.equal(a.codes, b.codes)


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("shape, group_size", [((150, 37), 16), ((1000, 300), 48)])
def test_quantizing_along_the_first_axis_equals_quantizing_the_transpose(
    rounding, shape, group_size
):
    """The second shape runs on threads, in several row blocks and 16 x 16 byte tiles."""
    x = sample(shape, seed=2)
    x[:, 7] = 0.0
    x[3, 9] = float("inf")
    seed = 3 if rounding == "stochastic" else None
    t = quantize_2d(x, 5, group_size, seed, transposed=True)
    ref = quantize_2d(x.T.contiguous(), 5, group_size, seed)
    assert torch.equal(t.codes, ref.codes) and torch.equal(t.shifts, ref.shifts)
    torch.testing.assert_close(t.scale, ref.scale, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize(
    ("m", "n", "k", "group_size", "bits"),
    [
        (1, 1, 4, 4, 8),
        (33, 65, 200, 64, 8),
        (100, 40, 515, 32, 4),
        (7, 300, 128, 128, 2),
        (130, 97, 1030, 64, 6),
        # Different widths (ShiftQuantLinear's backward multiplies grad_bits codes by bits
        # codes): each pair picks its own AVX2 kernel and int16 accumulation depth.
        (37, 29, 640, 128, (8, 6)),
        (37, 29, 640, 128, (6, 8)),
        (37, 29, 640, 128, (7, 7)),
        (37, 29, 640, 128, (4, 8)),
        (37, 29, 640, 128, (3, 5)),
    ],
)
def test_integer_gemm_equals_the_float64_product_of_the_dequantized_operands(
    m, n, k, group_size, bits
):
    bits_a, bits_b = bits if isinstance(bits, tuple) else (bits, bits)
    qa = fg.shiftquant(sample((m, k), 1), bits_a, group_size)
    qb = fg.shiftquant(sample((n, k), 2), bits_b, group_size)
    got = fg.shiftquant_matmul(qa, qb).double()
    da, db = dequantized(qa), dequantized(qb)
    want = da @ db.T
    magnitude = da.abs() @ db.abs().T  # the size of the terms, not of their possibly small sum
    assert ((got - want).abs() <= 1e-5 * magnitude + 1e-300).all()


def test_integer_gemm_rejects_code_minus_128():
    qa, qb = fg.shiftquant(sample((3, 64), 1)), fg.shiftquant(sample((4, 64), 2))
    qb.codes[2, 5] = -128
    with pytest.raises(ValueError, match=r"shiftquant_matmul: b.codes must lie in \[-127, 127\]"):
        fg.shiftquant_matmul(qa, qb)


def test_matmul_takes_leading_dims():
    qa = fg.shiftquant(sample((2, 3, 64), 1))
    qb = fg.shiftquant(sample((5, 64), 2))
    got = fg.shiftquant_matmul(qa, qb)
    assert got.shape == (2, 3, 5)
    torch.testing.assert_close(got.double(), dequantized(qa) @ dequantized(qb).T)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


def test_shiftquant_linear_gradients_follow_float32_at_8_bits():
    torch.manual_seed(0)
    ref = torch.nn.Linear(256, 96)
    layer = fg.nn.ShiftQuantLinear.from_linear(ref, bits=8)
    x = torch.randn(4, 50, 256)
    grad = torch.randn(4, 50, 96)
    xr, xq = x.clone().requires_grad_(), x.clone().requires_grad_()
    yr, yq = ref(xr), layer(xq)
    assert cosine(yq, yr) > 0.999
    yr.backward(grad)
    yq.backward(grad)
    assert cosine(xq.grad, xr.grad) >= 0.99
    assert cosine(layer.weight.grad, ref.weight.grad) >= 0.99
    torch.testing.assert_close(layer.bias.grad, ref.bias.grad, rtol=1e-5, atol=1e-4)


def test_shiftquant_linear_matches_its_definition():
    """Forward = product of the nearest-rounded operands; backward = products of the
    quantized gradient and operands (stochastic rounding at 8 bits stays within its steps)."""
    torch.manual_seed(1)
    layer = fg.nn.ShiftQuantLinear(100, 30, bits=6, group_size=32)
    x = torch.randn(20, 100)
    qx, qw = fg.shiftquant(x, 6, 32), fg.shiftquant(layer.weight.detach(), 6, 32)
    want = dequantized(qx) @ dequantized(qw).T + layer.bias.detach().double()
    torch.testing.assert_close(layer(x).double(), want, rtol=1e-5, atol=1e-5)


def test_quantize_model_swaps_and_keeps_parameters():
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.Sequential(torch.nn.Linear(32, 4))
    )
    w = model[0].weight.detach().clone()
    out = fg.nn.quantize_model(model, bits=6, grad_bits=8, group_size=16)
    assert out is model
    assert isinstance(model[0], fg.nn.ShiftQuantLinear) and torch.equal(model[0].weight, w)
    assert model[0].bits == 6 and model[0].grad_bits == 8 and model[0].group_size == 16
    assert isinstance(model[1], fg.nn.L1LayerNorm)
    assert isinstance(model[2][0], fg.nn.ShiftQuantLinear)
    kept = fg.nn.quantize_model(torch.nn.Sequential(torch.nn.LayerNorm(4)), norms=False)
    assert isinstance(kept[0], torch.nn.LayerNorm)


def test_torch_compile_runs_a_model_holding_the_ops():
    torch.manual_seed(2)
    model = fg.nn.quantize_model(
        torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 8))
    )
    x = torch.randn(6, 32)
    eager = model(x)
    compiled = torch.compile(model)
    out = compiled(x)
    torch.testing.assert_close(out, eager)
    out.sum().backward()
    assert model[0].weight.grad is not None and torch.isfinite(model[0].weight.grad).all()


class TinyTransformer(torch.nn.Module):
    """A one-block causal Transformer built from nn.Linear / nn.LayerNorm (so quantize_model
    swaps every GEMM)."""

    def __init__(self, vocab=16, dim=64, heads=4):
        super().__init__()
        self.heads = heads
        self.embed = torch.nn.Embedding(vocab, dim)
        self.pos = torch.nn.Parameter(torch.randn(32, dim) * 0.02)
        self.norm1, self.norm2, self.norm3 = (torch.nn.LayerNorm(dim) for _ in range(3))
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)
        self.up = torch.nn.Linear(dim, 4 * dim)
        self.down = torch.nn.Linear(4 * dim, dim)
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, ids):
        b, t = ids.shape
        h = self.embed(ids) + self.pos[:t]
        q, k, v = self.qkv(self.norm1(h)).view(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        att = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.proj(att.transpose(1, 2).reshape(b, t, -1))
        h = h + self.down(torch.nn.functional.gelu(self.up(self.norm2(h))))
        return self.head(self.norm3(h))


def motif_batch(generator: torch.Generator, rows: int = 32) -> torch.Tensor:
    """Sequences that repeat a random 8-token motif: learnable only through attention."""
    return torch.randint(0, 16, (rows, 8), generator=generator).repeat(1, 4)


def train_tiny(bits: int | None, steps: int = 300) -> float:
    """The mean loss of the last 20 steps of ``fit_tiny``."""
    return fit_tiny(bits, steps)[1]


def fit_tiny(bits: int | None, steps: int = 300) -> tuple[TinyTransformer, float]:
    """Trains TinyTransformer (ShiftQuant at ``bits`` unless None) on motif sequences."""
    torch.manual_seed(0)
    model = TinyTransformer()
    if bits is not None:
        fg.nn.quantize_model(model, bits=bits)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        ids = motif_batch(data)
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 16), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model, sum(losses[-20:]) / 20


@pytest.mark.slow
def test_a_small_transformer_trains_at_8_bits_like_float32():
    reference_loss = train_tiny(None)
    quantized_loss = train_tiny(8)
    assert reference_loss < 0.7 * math.log(16)  # it learned something
    assert abs(quantized_loss - reference_loss) <= 0.02 * reference_loss + 0.01


def test_bad_input():
    x = torch.randn(4, 64)
    with pytest.raises(ValueError, match="shiftquant: bits"):
        fg.shiftquant(x, bits=9)
    with pytest.raises(ValueError, match="shiftquant: bits"):
        fg.shiftquant(x, bits=1)
    with pytest.raises(ValueError, match="group_size must be a positive multiple of 4"):
        fg.shiftquant(x, group_size=6)
    with pytest.raises(TypeError, match="shiftquant: x must be a floating-point"):
        fg.shiftquant(torch.ones(4, 8, dtype=torch.int32))
    with pytest.raises(TypeError, match="shiftquant: x must be a torch.Tensor"):
        fg.shiftquant([1.0, 2.0])
    with pytest.raises(ValueError, match="rounding"):
        fg.shiftquant(x, rounding="up")
    with pytest.raises(NotImplementedError, match="CPU and CUDA tensors"):
        fg.shiftquant(torch.randn(4, 8, device="meta"))
    a = fg.shiftquant(x, group_size=32)
    with pytest.raises(ValueError, match="K differs"):
        fg.shiftquant_matmul(a, fg.shiftquant(torch.randn(3, 60), group_size=32))
    with pytest.raises(ValueError, match="group sizes differ"):
        fg.shiftquant_matmul(a, fg.shiftquant(torch.randn(3, 64), group_size=16))
    with pytest.raises(TypeError, match="ShiftQuantTensor"):
        fg.shiftquant_matmul(a, torch.randn(3, 64))
    with pytest.raises(ValueError, match="in_features"):
        fg.nn.ShiftQuantLinear(64, 8)(torch.randn(2, 63))
    with pytest.raises(ValueError, match="bits"):
        fg.nn.ShiftQuantLinear(64, 8, bits=12)


def test_nan_and_infinity_poison_their_row_only():
    x = sample((3, 128))
    x[1, 5] = float("nan")
    x[2, 70] = float("inf")
    q = fg.shiftquant(x)
    assert q.scale[0].isfinite() and q.scale[1:].isnan().all()
    d = q.dequantize()
    assert d[0].isfinite().all() and d[1:].isnan().all()
    out = fg.shiftquant_matmul(q, fg.shiftquant(sample((4, 128), 3)))
    assert out[0].isfinite().all() and out[1:].isnan().all()
    assert not x[0].isnan().any()  # the caller's tensor is untouched
