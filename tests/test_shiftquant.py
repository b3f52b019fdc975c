"""ShiftQuant against a plain float64 torch implementation of its definition
(docs/definitions.md), and every device's kernels against reference.py (the quantizer bit for
bit, the GEMM within float32 rounding of the float64 product): CPU always, CUDA where there is a
GPU. The CUDA GEMM's fragment decomposition is also emulated on the CPU (tests/support)."""

from __future__ import annotations

import copy
import io
import math
from pathlib import Path

import pytest
import torch
from support.shiftquant_emulation import KERNEL_INDEX, emulate_gemm
from support.tiny_transformer import TinyTransformer, motif_batch, train_tiny

import ferrograd as fg
from ferrograd.ops import shiftquant as sq
from ferrograd.ops.shiftquant import cpu as sq_cpu
from ferrograd.ops.shiftquant import cuda as sq_cuda
from ferrograd.ops.shiftquant import linear, quantize_2d
from ferrograd.ops.shiftquant import reference as sq_reference

pytestmark = pytest.mark.simd

KERNEL = Path(__file__).resolve().parent.parent / "kernels" / "shiftquant.cu"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")


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


def test_stochastic_draws_are_independent_across_rows_and_columns():
    """Codes of t = 1/2 round up with probability 1/2 each, with no pattern along rows, along
    columns or between neighbours (a key shared by rows, or draws repeating along a row, would
    show as a correlation near 1)."""
    x = torch.full((512, 512), 0.5 / 127)
    x[:, ::64] = 1.0  # every group's max: scale 1/127, shift 0, so t = 127 x = 1/2
    up = fg.shiftquant(x, 8, rounding="stochastic", seed=11).codes.double()
    up = up[:, torch.arange(512) % 64 != 0]
    assert set(up.unique().tolist()) == {0.0, 1.0}
    assert abs(up.mean().item() - 0.5) < 4 * 0.5 / up.numel() ** 0.5

    def corr(a: torch.Tensor, b: torch.Tensor) -> float:
        a, b = a - a.mean(), b - b.mean()
        return ((a * b).mean() / (a.std() * b.std())).item()

    # About 250k pairs each: the standard error of a zero correlation is 0.002.
    for a, b in [
        (up[1:], up[:-1]),
        (up[:, 1:], up[:, :-1]),
        (up[:, 16:], up[:, :-16]),
        (up[64:], up[:-64]),
    ]:
        assert abs(corr(a, b)) < 0.01
    # Row and column means spread as means of independent draws do.
    for means, count in [(up.mean(1), up.shape[1]), (up.mean(0), up.shape[0])]:
        assert 0.7 < means.std().item() / (0.5 / count**0.5) < 1.3


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


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(("n", "k"), [(1041, 701), (509, 700)])
def test_integer_gemm_across_blocks_tiles_and_threads(threads, n, k):
    # M past several row blocks of C, M and N not multiples of the micro-kernel's tile, K past
    # several K blocks and not a multiple of the group size, and enough work for the second
    # thread (when given) to take blocks. N past several column blocks with K not a multiple
    # of 4: A packed; N within one column block with K a multiple of 4: the VNNI kernel reads
    # A where it lies.
    m, group_size = 389, 64
    qa = fg.shiftquant(sample((m, k), 7), 8, group_size)
    qb = fg.shiftquant(sample((n, k), 8), 8, group_size)
    fg.set_num_threads(threads)  # conftest restores the default
    got = fg.shiftquant_matmul(qa, qb).double()
    da, db = dequantized(qa), dequantized(qb)
    assert ((got - da @ db.T).abs() <= 1e-5 * (da.abs() @ db.abs().T) + 1e-300).all()


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


def test_a_float64_layer_adds_its_bias_in_float64():
    """With float64 x the product is float32-precise (the integer GEMM's float32 scales), but
    the bias is not rounded to float32 with it: a bias far larger than the product comes back
    to float64 precision (a fuzz case; float32 rounding put y 2.5e-9 relative off)."""
    torch.manual_seed(0)
    layer = fg.nn.ShiftQuantLinear(1, 11, bits=6, group_size=8).double()
    with torch.no_grad():
        layer.bias.copy_(torch.rand(11, dtype=torch.float64) + 0.25)
    x = torch.full((3, 1), 1e-9, dtype=torch.float64)
    y = layer(x)
    assert y.dtype == torch.float64
    want = x @ layer.weight.detach().T + layer.bias.detach()
    # The product is 1e-9 at most: float32's rounding of it is far below 1e-15.
    torch.testing.assert_close(y, want, rtol=1e-15, atol=1e-15)


def _definition(layer, x):
    """The forward of the definition on the layer's weight as it is now, in float64."""
    bits, gs = layer.bits, layer.group_size
    w, b = layer.weight.detach().float(), layer.bias.detach().double()
    return dequantized(fg.shiftquant(x, bits, gs)) @ dequantized(fg.shiftquant(w, bits, gs)).T + b


def _adamw(layer):
    return torch.optim.AdamW(layer.parameters(), lr=0.05, fused=True)


def _step(make_optimizer):
    def update(layer):
        layer(torch.randn(3, 64)).square().sum().backward()
        make_optimizer(layer).step()

    return update


def _replace_weight(layer):
    layer.weight = torch.nn.Parameter(layer.weight.detach() * 2)


def _assign_data(layer):
    layer.weight.data = layer.weight.detach() * 2


def _load(layer):
    layer.load_state_dict({k: v * 2 for k, v in layer.state_dict().items()})


def _in_place(layer):
    with torch.no_grad():
        layer.weight.mul_(-1)


def _through_data(layer):
    layer.weight.data.mul_(2)  # torch records no write: the sampled elements show it


def _few_through_data(layer):
    layer.weight.data[3, 5] += 1  # unrecorded, and between the sampled elements
    layer.clear_weight_codes()  # the caller's to clear


def _regathered(layer):
    """What FSDP2 does to an unsharded weight between forwards: its memory freed, allocated
    again (often at the same address) and written with the version counter kept."""
    w = layer.weight
    new = w.detach() * -1
    storage = w.untyped_storage()
    size = storage.nbytes()
    storage.resize_(0)
    storage.resize_(size)
    with torch.no_grad(), torch.autograd._unsafe_preserve_version_counter(w):
        w.copy_(new)


@pytest.mark.parametrize(
    "update",
    [
        _step(_adamw),  # fused: the parameter's version counter does not move
        _step(lambda m: torch.optim.SGD(m.parameters(), lr=0.1, foreach=True)),
        _step(lambda m: fg.optim.SPAM(m.parameters(), lr=0.05)),
        _load,
        _replace_weight,
        _assign_data,
        _in_place,
        lambda m: m.to(torch.bfloat16).float(),
        lambda m: setattr(m, "bits", 5),
        _through_data,
        _few_through_data,
        _regathered,
    ],
    ids=[
        "adamw-fused",
        "sgd-foreach",
        "spam",
        "load_state_dict",
        "new-parameter",
        "data-assignment",
        "in-place-op",
        "to-dtype",
        "bits",
        "data-write",
        "few-data-writes-then-clear",
        "fsdp2-regather",
    ],
)
@pytest.mark.parametrize("cache", [True, None])
def test_cached_weight_codes_never_outlive_an_update_of_the_weight(update, cache):
    torch.manual_seed(5)
    layer = fg.nn.ShiftQuantLinear(64, 24, bits=6, group_size=16, cache_weight_codes=cache)
    x = sample((7, 64), 3)
    with torch.no_grad():
        before = layer(x)
    update(layer)
    with torch.no_grad():
        after = layer(x)
    torch.testing.assert_close(after.double(), _definition(layer, x), rtol=1e-5, atol=1e-5)
    assert not torch.equal(after, before)


def test_cached_weight_codes_are_reused_and_give_the_uncached_results():
    """Two micro-batches per optimizer step (gradient accumulation) and an evaluation between
    steps: the cached layer's outputs and gradients equal the uncached one's bit for bit, and
    each weight is quantized once per step."""
    torch.manual_seed(6)
    plain = fg.nn.ShiftQuantLinear(96, 40, bits=8, group_size=32)
    cached = copy.deepcopy(plain)
    cached.cache_weight_codes = True
    optimizers = [torch.optim.AdamW(m.parameters(), lr=0.01, fused=True) for m in (plain, cached)]
    for step in range(3):
        made = []
        for micro in range(2):
            x = sample((2, 9, 96), 10 * step + micro)
            results = []
            for layer in (plain, cached):
                xi = x.clone().requires_grad_()
                torch.manual_seed(step)  # the same stochastic rounding for both
                y = layer(xi)
                y.backward(torch.ones_like(y))
                results.append((y, xi.grad))
            made.append([t.data_ptr() for t in cached._codes.forward + cached._codes.transposed])
            for got, want in zip(*results, strict=True):
                assert torch.equal(got, want)
        assert made[0] == made[1] and len(made[0]) == 8  # Q(W) and Q(Wᵀ) made once
        assert torch.equal(cached.weight.grad, plain.weight.grad)
        for o in optimizers:
            o.step()
            o.zero_grad()
        with torch.no_grad():
            x = sample((5, 96), 99)
            assert torch.equal(cached(x), plain(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_weight_packed_ahead_gives_the_float64_product(dtype):
    a, w = sample((9, 200), 11), sample((70, 200), 12)
    qa, qw = (sq_cpu.quantize(t, 8, 32, None, False) for t in (a, w))
    packed = sq_cpu.pack_weight(*qw, 32)
    got = sq_cpu.matmul(*qa, *qw, 32, None, dtype, packed_b=packed)
    want = dequantized(quantize_2d(a, 8, 32)) @ dequantized(quantize_2d(w, 8, 32)).T
    tol = 1e-5 if dtype == torch.float32 else 4e-3
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    other = sq_cpu.quantize(sample((71, 200), 13), 8, 32, None, False)
    with pytest.raises(ValueError, match="shiftquant_matmul: packed_b was packed for 70 x 200"):
        sq_cpu.matmul(*qa, *other, 32, None, dtype, packed_b=packed)
    with pytest.raises(ValueError, match="shiftquant_matmul: packed_b"):
        sq_cpu.matmul(*qa, *qw, 32, None, dtype, packed_b=packed[:-64])


@pytest.fixture
def weight_codes_made(monkeypatch) -> list[bool]:
    """Every Q(W) the layers make for their cache, as its ``transposed`` flag."""
    from ferrograd.nn import shiftquant as sq_nn

    made = []
    real = sq_nn.weight_operand

    def counting(*args, **kwargs):
        made.append(kwargs.get("transposed", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(sq_nn, "weight_operand", counting)
    return made


def test_by_default_calls_without_gradients_share_the_weights_codes(weight_codes_made):
    """The default policy: calls that want no gradient (no_grad, a frozen layer fed an input
    without one) quantize the weight once and give the uncached results bit for bit; a call
    that trains uses no cache and lets the kept codes go."""
    torch.manual_seed(8)
    layer = fg.nn.ShiftQuantLinear(96, 40, bits=7, group_size=32)
    plain = copy.deepcopy(layer)
    plain.cache_weight_codes = False
    xs = [sample((3, 96), i) for i in range(3)]
    with torch.no_grad():
        for x in xs:
            assert torch.equal(layer(x), plain(x))
    assert weight_codes_made == [False] and layer._codes is not None

    xi = xs[0].clone().requires_grad_()
    torch.manual_seed(1)
    y = layer(xi)
    y.backward(torch.ones_like(y))
    assert layer._codes is None and weight_codes_made == [False]
    want = xi.grad.clone()
    xi.grad = None
    torch.manual_seed(1)
    plain(xi).backward(torch.ones_like(y))
    assert torch.equal(xi.grad, want)

    layer.requires_grad_(False)  # frozen, and an input without a gradient: nothing to train
    for x in xs:
        assert torch.equal(layer(x), plain(x))
    assert weight_codes_made == [False, False]
    plain.requires_grad_(True)
    with torch.no_grad():
        plain(xs[0])
    assert plain._codes is None  # cache_weight_codes=False keeps nothing


def test_checkpointing_recomputes_the_forward_from_the_cached_codes(weight_codes_made):
    made = weight_codes_made
    layer = fg.nn.ShiftQuantLinear(64, 32, cache_weight_codes=True)
    x = sample((8, 64), 5).requires_grad_()
    y = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
    y.backward(torch.ones_like(y))
    assert made == [False, True]  # Q(W) and Q(Wᵀ) once; the recomputed forward hit the cache
    assert x.grad is not None and layer.weight.grad is not None


@pytest.mark.parametrize("numel", [1, 2, 63, 64, 65, 2**24 + 1, 65_536_000, 2**40 + 7])
def test_sampled_weight_elements_span_the_weight(numel):
    """The cache's sampled elements run from the first to the last (bench/model.py's 65.5M
    element embedding-tied head once got an index past its end from a float32 linspace)."""
    from ferrograd.ops.shiftquant.kept import _sample_index

    index = _sample_index(numel)
    assert index[0] == 0 and index[-1] == numel - 1
    assert len(index) == min(numel, 64) and bool((index[1:] > index[:-1]).all())


def test_a_copied_or_pickled_layer_leaves_the_cache_behind():
    layer = fg.nn.ShiftQuantLinear(64, 16, cache_weight_codes=True)
    x = sample((3, 64), 4)
    with torch.no_grad():
        want = layer(x)
    assert layer._codes is not None
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    for other in (copy.deepcopy(layer), torch.load(buffer, weights_only=False)):
        assert other._codes is None and other.cache_weight_codes
        with torch.no_grad():
            assert torch.equal(other(x), want)


def test_cached_weight_codes_under_torch_compile_and_bad_flags():
    torch.manual_seed(7)
    layer = fg.nn.ShiftQuantLinear(64, 16, cache_weight_codes=True)
    x = sample((4, 64), 2)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(
            compiled(x).double(), _definition(layer, x), rtol=1e-5, atol=1e-5
        )
    with pytest.raises(TypeError, match="cache_weight_codes must be a bool or None"):
        fg.nn.ShiftQuantLinear(8, 8, cache_weight_codes=1)


def test_calls_with_kept_codes_give_the_ops_results_and_errors():
    """Calls without gradients that use kept codes skip the op's dispatch: every input dtype,
    autocast and a batch of rows give the uncached layer's bits, and bad input the op's errors."""
    torch.manual_seed(9)
    layer = fg.nn.ShiftQuantLinear(64, 24, group_size=32)
    plain = copy.deepcopy(layer)
    plain.cache_weight_codes = False
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            x = sample((2, 3, 64), 3).to(dtype)
            assert torch.equal(layer(x), plain(x))
            with torch.autocast("cpu", dtype=torch.bfloat16):
                got = layer(x)
                assert torch.equal(got, plain(x))
            assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.bfloat16)
        assert layer._codes is not None
        for bad, error, match in [
            (torch.ones(2, 64, dtype=torch.int32), TypeError, "x must be a floating-point"),
            (torch.randn(2, 63), ValueError, "x.s last dim must be in_features=64"),
            (torch.randn(()), ValueError, "x.s last dim must be in_features=64"),
            ([1.0] * 64, TypeError, "x must be a torch.Tensor"),
            (torch.randn(2, 64, device="meta"), NotImplementedError, "x is on meta"),
        ]:
            with pytest.raises(error, match=f"shiftquant_linear: {match}"):
                layer(bad)


def test_compiled_calls_without_gradients_keep_the_weights_codes():
    """Under torch.compile (fullgraph) a call without gradients takes Q(W) kept per weight by
    the op (ops/shiftquant/kept.py): made once, made again after an optimizer step and after an
    unrecorded write, each result the uncached layer's bits; calls that train and layers with
    cache_weight_codes=False keep nothing."""
    from ferrograd.ops.shiftquant import kept

    torch.manual_seed(10)
    layer = fg.nn.ShiftQuantLinear(96, 40, group_size=32)
    plain = copy.deepcopy(layer)
    plain.cache_weight_codes = False
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.05, fused=True)

    def packed():
        return kept._KEPT[layer.weight][(layer.bits, layer.group_size)].forward[3].data_ptr()

    xs = [sample((3, 96), i) for i in range(3)]
    made = []
    for round in range(3):
        with torch.no_grad():
            for x in xs:
                assert torch.equal(compiled(x), plain(x))
                made.append(packed())
        assert len(set(made[-3:])) == 1  # once per round
        assert round == 0 or made[-4] != made[-3]  # and anew after the weight changed
        if round == 0:  # a training step, compiled: nothing kept by it
            compiled(xs[0]).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
        else:  # a write torch does not record
            layer.weight.data.mul_(0.5)
        plain.load_state_dict(layer.state_dict())
    assert layer._codes is None
    layer.clear_weight_codes()
    assert layer.weight not in kept._KEPT
    plain.cache_weight_codes = False
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(plain, fullgraph=True)(xs[0])
    assert plain.weight not in kept._KEPT


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
    with pytest.raises(ValueError, match="shiftquant: group_size .* below 2\\^62"):
        fg.shiftquant(x, group_size=2**64)
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


def test_fields_of_the_wrong_type_are_errors_naming_the_op_and_the_field():
    """Fuzz findings: a numpy field reached .device (a str in numpy 2) and the dequantize
    kernel's own name started the message; grad_bits was reported as bits."""
    q = fg.shiftquant(torch.randn(4, 64), group_size=32)
    fields = {f: getattr(q, f) for f in ("codes", "scale", "shifts", "bits", "group_size")}
    bad = [
        ("codes", q.codes.numpy(), TypeError),
        ("codes", q.codes.to(torch.int16), TypeError),
        ("scale", q.scale.double(), TypeError),
        ("shifts", q.shifts[:, :1], ValueError),
        ("group_size", 6, ValueError),
    ]
    for field, value, error in bad:
        broken = fg.ShiftQuantTensor(**{**fields, field: value})
        with pytest.raises(error, match=f"^ShiftQuantTensor.dequantize: .*{field}"):
            broken.dequantize()
        with pytest.raises(error, match=f"^shiftquant_matmul: .*b_q.*{field}"):
            fg.shiftquant_matmul(q, broken)
    with pytest.raises(ValueError, match="^ShiftQuantLinear: grad_bits must be in 2..8"):
        fg.nn.ShiftQuantLinear(64, 8, grad_bits=1)
    with pytest.raises(ValueError, match="^shiftquant_linear: grad_bits must be in 2..8"):
        fg.ops.shiftquant.shiftquant_linear(torch.randn(2, 64), torch.randn(8, 64), grad_bits=9)
    with pytest.raises(ValueError, match="^ShiftQuantLinear: in_features must be at least 0"):
        fg.nn.ShiftQuantLinear(-1, 8)
    with pytest.raises(TypeError, match="^ShiftQuantLinear: out_features must be an int"):
        fg.nn.ShiftQuantLinear(8, 2.5)


def test_linear_with_no_outputs_has_a_backward():
    """Fuzz finding: out_features=0 made the backward reshape [..., 0] with -1 (a raw error)."""
    layer = fg.nn.ShiftQuantLinear(8, 0)
    x = torch.randn(3, 8, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert y.shape == (3, 0) and torch.equal(x.grad, torch.zeros(3, 8))
    assert layer.weight.grad.shape == (0, 8) and layer.bias.grad.shape == (0,)


def test_under_autocast_the_output_has_the_autocast_dtype_and_x_is_not_cast():
    """As nn.Linear under autocast, the result is bf16; x is quantized as it is (float32), so the
    result is the float32 layer's rounded to bf16. Gradients keep x's and the weight's dtypes;
    float64 inputs stay float64, as autocast leaves them."""
    torch.manual_seed(0)
    layer = fg.nn.ShiftQuantLinear(256, 96)
    x = sample((3, 40, 256), 11).requires_grad_()
    with torch.autocast("cpu", torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, layer(x.detach()).to(torch.bfloat16))
    y.float().square().sum().backward()
    assert x.grad.dtype == torch.float32 and layer.weight.grad.dtype == torch.float32
    assert layer.bias.grad.dtype == torch.float32
    with torch.autocast("cpu", torch.bfloat16):
        assert layer.double()(x.detach().double()).dtype == torch.float64


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


# ---- every device against reference.py ----


def reference_quantization(x: torch.Tensor, bits, group_size, seed=None, transposed=False):
    """reference.py's codes, scale and shifts of the CPU copy of x."""
    key = None if seed is None else seed % 2**64
    codes, scale, shifts = sq_reference.quantize(x.cpu(), bits, group_size, key, transposed)
    return sq.ShiftQuantTensor(codes, scale, shifts, bits, group_size)


def assert_same_quantization(ours, want):
    assert torch.equal(ours.codes.cpu(), want.codes)
    assert torch.equal(ours.shifts.cpu(), want.shifts)
    torch.testing.assert_close(ours.scale.cpu(), want.scale, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("bits", [2, 4, 6, 8])
@pytest.mark.parametrize("group_size", [4, 12, 64, 256])
@pytest.mark.parametrize("k", [1, 37, 64, 1000, 4096])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_codes_equal_the_reference(device, bits, group_size, k, rounding):
    x = sample((9, k), k)
    kw = dict(bits=bits, group_size=group_size, rounding=rounding, seed=123)
    want = reference_quantization(x, bits, group_size, 123 if rounding == "stochastic" else None)
    assert_same_quantization(fg.shiftquant(x.to(device), **kw), want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_are_read_as_they_are(device, dtype):
    x = sample((5, 300), 1).to(dtype)
    kw = dict(bits=6, group_size=32, rounding="stochastic", seed=5)
    assert_same_quantization(
        fg.shiftquant(x.to(device), **kw), reference_quantization(x.float(), 6, 32, 5)
    )


@pytest.mark.parametrize("seed", [None, 9])
def test_transposed_bf16_inputs_are_read_as_they_are(device, seed):
    x = sample((1001, 70), 3).bfloat16()
    ours = quantize_2d(x.to(device), 8, 64, seed, transposed=True)
    assert_same_quantization(ours, reference_quantization(x.float(), 8, 64, seed, True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_column_sums_come_with_the_transposed_codes(dtype):
    """The CPU kernel's fused bias-gradient pass: the codes of quantizing along the first axis
    and the float32 column sums, against the reference rule and a float64 sum."""
    x = sample((1001, 70), 4).to(dtype)
    x[:, 3] = 0
    codes, sums = sq_cpu.quantize_with_col_sums(x, 6, 64, 7)
    q = sq.ShiftQuantTensor(*codes, 6, 64)
    assert_same_quantization(q, reference_quantization(x.float(), 6, 64, 7, True))
    want = x.double().sum(0)
    assert sums.dtype == torch.float32 and sums[3] == 0
    assert ((sums.double() - want).abs() <= 1e-6 * x.double().abs().sum(0)).all()


@pytest.mark.parametrize("shape", [(64, 32), (1001, 70), (37, 5), (4096, 33)])
@pytest.mark.parametrize("group_size", [4, 64, 600])
@pytest.mark.parametrize("seed", [None, 9, 2**64 - 1])
def test_transposed_quantization_equals_the_reference(device, shape, group_size, seed):
    x = sample(shape, 2)
    ours = quantize_2d(x.to(device), 5, group_size, seed, transposed=True)
    assert_same_quantization(ours, reference_quantization(x, 5, group_size, seed, True))


@pytest.mark.parametrize("seed", [None, 4])
def test_special_rows_and_magnitudes(device, seed):
    x = sample((6, 130), 3)
    x[1] = 0.0
    x[2, 7] = float("nan")
    x[3, 100] = float("-inf")
    x[4] *= 1e-38  # denormal groups
    x[5] *= 3e36
    for transposed in (False, True):
        xs = x.T.contiguous() if transposed else x
        ours = quantize_2d(xs.to(device), 8, 16, seed, transposed)
        assert_same_quantization(ours, reference_quantization(xs, 8, 16, seed, transposed))


def test_dequantize_equals_the_reference(device):
    q = fg.shiftquant(sample((7, 150), 4).to(device), bits=4, group_size=16)
    cpu = sq.ShiftQuantTensor(*(t.cpu() for t in (q.codes, q.scale, q.shifts)), 4, 16)
    want = sq_reference.dequantize(cpu.codes, cpu.scale, cpu.shifts, 16)
    assert torch.equal(q.dequantize().cpu(), want)


@pytest.mark.parametrize("group_size", [0, -4])
def test_quantize_op_refuses_a_group_size_below_one(group_size):
    """The op itself: group_size 0 was a ZeroDivisionError, -4 a tensor of negative size."""
    with pytest.raises(ValueError, match="shiftquant: group_size must be a positive multiple"):
        torch.ops.ferrograd.shiftquant_quantize(torch.randn(8, 64), 8, group_size, None, False)


def test_dequantize_op_refuses_a_scale_per_other_rows():
    """The op itself (not only ShiftQuantTensor.dequantize) wants one scale per row of codes:
    codes [8, 64] with 4 scales and 8 shifts read as 4 rows of 128 in the Rust kernel."""
    q = fg.shiftquant(sample((8, 128), 8), bits=8, group_size=64)
    codes = q.codes.reshape(16, 64)  # 16 rows of one group each; q.scale has 8
    shifts = q.shifts.reshape(16, 1)
    with pytest.raises(ValueError, match="shiftquant_dequantize: scale must hold one value"):
        torch.ops.ferrograd.shiftquant_dequantize(codes, q.scale, shifts, 64)
    got = torch.ops.ferrograd.shiftquant_dequantize(q.codes, q.scale, q.shifts, 64)
    assert torch.equal(got, sq_reference.dequantize(q.codes, q.scale, q.shifts, 64))


@pytest.mark.parametrize(
    "m, n, k, group_size",
    [
        (1, 8, 64, 64),
        (77, 300, 1000, 64),
        (256, 256, 4096, 128),
        (130, 129, 96, 32),
        (50, 40, 200, 48),
    ],
)
@pytest.mark.parametrize("bias", [False, True])
def test_gemm_equals_the_float64_product(device, m, n, k, group_size, bias):
    qa = fg.shiftquant(sample((m, k), 4).to(device), bits=8, group_size=group_size)
    qb = fg.shiftquant(sample((n, k), 5).to(device), bits=6, group_size=group_size)
    c = torch.randn(n) if bias else None
    got = sq.matmul_2d(qa, qb, None if c is None else c.to(device)).double().cpu()
    da, db = dequantized(qa).cpu(), dequantized(qb).cpu()
    want, bound = da @ db.T, da.abs() @ db.abs().T
    if c is not None:
        want, bound = want + c.double(), bound + c.double().abs()
    assert ((got - want).abs() <= 1e-5 * bound + 1e-30).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gemm_epilogue_rounds_to_the_output_dtype(device, dtype):
    qa = fg.shiftquant(sample((100, 512), 6).to(device))
    qb = fg.shiftquant(sample((72, 512), 7).to(device))
    f32 = sq.matmul_2d(qa, qb)
    low = sq.matmul_2d(qa, qb, None, dtype)
    assert low.dtype == dtype
    assert torch.equal(low, f32.to(dtype))


def test_public_matmul_and_leading_dims(device):
    qa = fg.shiftquant(sample((2, 3, 256), 8).to(device))
    qb = fg.shiftquant(sample((10, 256), 9).to(device))
    out = fg.shiftquant_matmul(qa, qb)
    assert out.shape == (2, 3, 10) and out.device.type == device
    a, b = (
        sq.ShiftQuantTensor(q.codes.cpu(), q.scale.cpu(), q.shifts.cpu(), 8, 64) for q in (qa, qb)
    )
    want = sq_reference.matmul(
        a.codes.reshape(6, 256), a.scale.reshape(6), a.shifts.reshape(6, -1),
        b.codes, b.scale, b.shifts, 64, None, torch.float32,
    )  # fmt: skip
    torch.testing.assert_close(out.cpu(), want.reshape(2, 3, 10), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shiftquant_linear_matches_the_reference(device, dtype):
    """Forward and the three gradients on ``device`` against linear.py over reference.py's
    kernels (the stochastic rounding keyed by the same draw of torch's generator)."""
    torch.manual_seed(0)
    layer = fg.nn.ShiftQuantLinear(256, 192, bits=6).to(dtype)
    x = sample((4, 33, 256), 10).to(dtype)
    grad = torch.randn(4, 33, 192).to(dtype)
    w, b = layer.weight.detach(), layer.bias.detach()
    torch.manual_seed(1)
    seed = int(sq.seed_tensor())
    want = [linear.forward(sq_reference, x, w, b, 6, 6, 64)]
    want += linear.backward(sq_reference, grad, x, w, 6, 6, 64, seed)
    ours = copy.deepcopy(layer).to(device)
    xi = x.to(device).requires_grad_()
    torch.manual_seed(1)  # the backward's draw
    y = ours(xi)
    y.backward(grad.to(device))
    got = [t.cpu() for t in (y, xi.grad, ours.weight.grad, ours.bias.grad)]
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g.float(), r.float(), **tol)


def test_backward_computes_only_the_gradients_autograd_asks_for(device, monkeypatch):
    """A frozen weight skips dW's quantizations and GEMM, an input without a gradient dX's;
    what is computed is the same bits as with everything asked for (the seeds are separate)."""
    torch.manual_seed(0)
    layer = fg.nn.ShiftQuantLinear(128, 96, bits=6).to(device)
    x = sample((2, 40, 128), 3).to(device)
    grad = torch.randn(2, 40, 96, device=device)

    def run(x_grad: bool, w_grad: bool, b_grad: bool):
        xi = x.clone().requires_grad_(x_grad)
        layer.weight.requires_grad_(w_grad)
        layer.bias.requires_grad_(b_grad)
        layer.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the backward's seed
        layer(xi).backward(grad)
        return xi.grad, layer.weight.grad, layer.bias.grad

    full = run(True, True, True)
    matmuls = []
    kernels = sq_cpu if device == "cpu" else sq.cuda
    real = kernels.matmul
    monkeypatch.setattr(kernels, "matmul", lambda *a, **k: matmuls.append(1) or real(*a, **k))
    for wanted in [(True, False, False), (False, True, False), (False, False, True),
                   (True, False, True), (False, True, True)]:  # fmt: skip
        matmuls.clear()
        got = run(*wanted)
        assert len(matmuls) == 1 + wanted[0] + wanted[1], wanted  # the forward's, dX's, dW's
        for g, f, w in zip(got, full, wanted, strict=True):
            assert (g is None) if not w else torch.equal(g, f), wanted
    layer.requires_grad_(True)


@pytest.mark.parametrize("cached", [False, True])
def test_frozen_weight_does_not_keep_the_input(device, cached):
    """x feeds only dW: a frozen layer's graph node keeps no copy or view of x (torch's linear
    keeps its input only for the weight's gradient), and dX is the same bits as a trained
    layer's."""
    torch.manual_seed(0)
    layer = fg.nn.ShiftQuantLinear(128, 96, cache_weight_codes=cached).to(device)
    x = sample((3, 40, 128), 3).to(device).requires_grad_()
    grad = torch.randn(3, 40, 96, device=device)

    def run(w_grad: bool):
        layer.weight.requires_grad_(w_grad)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            torch.manual_seed(1)  # the backward's seed
            y = layer(x)
        (dx,) = torch.autograd.grad(y, x, grad)
        return saved, dx

    trained_saved, trained_dx = run(True)
    frozen_saved, frozen_dx = run(False)
    layer.requires_grad_(True)
    ptr = x.untyped_storage().data_ptr()
    assert any(t.untyped_storage().data_ptr() == ptr for t in trained_saved)  # the check works
    assert not any(t.untyped_storage().data_ptr() == ptr for t in frozen_saved)
    # Besides the layer's own tensors (its weight, its cached codes) only a one-element
    # stand-in for x.
    own = [layer.weight, *(layer._codes.transposed if cached else [])]
    own_ptrs = {t.untyped_storage().data_ptr() for t in own}
    kept = [t for t in frozen_saved if t.untyped_storage().data_ptr() not in own_ptrs]
    assert [t.untyped_storage().nbytes() for t in kept] == [x.element_size()]
    assert torch.equal(frozen_dx, trained_dx)


def test_workspace_operands_leave_the_layers_results_alone(monkeypatch):
    """The CPU layer's quantized operands share one workspace per slot across calls: results
    equal those from fresh tensors (workspace off), and a later call of another shape does not
    touch an earlier call's outputs."""
    torch.manual_seed(0)
    shapes = [(96, 256, 192), (40, 128, 320)]  # (tokens, in, out): the second reuses slots
    runs = []
    for _ in range(2):
        results = []
        for m, k, n in shapes:
            x, w = sample((m, k), m), sample((n, k), n + 1)
            grad = sample((m, n), m + 2)
            y = linear.forward(sq_cpu, x, w, None, 8, 8, 64)
            results.append([y, *linear.backward(sq_cpu, grad, x, w, 8, 8, 64, seed=5)])
        runs.append(results)
        monkeypatch.setattr(sq_cpu, "WORKSPACE_MAX_BYTES", 0)
    kept = [[t.clone() for t in r] for r in runs[0]]
    for m, k, n in shapes:  # more calls through the workspace
        linear.forward(sq_cpu, sample((m, k), 7), sample((n, k), 8), None, 8, 8, 64)
    for with_ws, fresh, before in zip(runs[0], runs[1], kept, strict=True):
        for a, b, c in zip(with_ws, fresh, before, strict=True):
            assert torch.equal(a, b) and torch.equal(a, c)


@needs_cuda
def test_a_training_step_matches_the_cpu_path():
    """Attention differs in its last bits between the devices, which may flip a code here and
    there: the loss and the direction of every parameter's update must still agree."""
    torch.manual_seed(0)
    cpu = fg.nn.quantize_model(TinyTransformer(), bits=8)
    gpu = copy.deepcopy(cpu).cuda()
    before = [p.detach().clone() for p in cpu.parameters()]
    ids = motif_batch(torch.Generator().manual_seed(1))
    losses = []
    for model, dev in ((cpu, "cpu"), (gpu, "cuda")):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        torch.manual_seed(2)
        batch = ids.to(dev)
        logits = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 16), batch[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert abs(losses[0] - losses[1]) <= 1e-4 * losses[0]
    params = zip(cpu.named_parameters(), gpu.parameters(), before, strict=True)
    for (name, p_cpu), p_gpu, p0 in params:
        du_cpu, du_gpu = (p_cpu.detach() - p0).flatten(), (p_gpu.detach().cpu() - p0).flatten()
        cos = torch.nn.functional.cosine_similarity(du_cpu, du_gpu, dim=0)
        assert cos >= 0.999, name


def test_malformed_operands(device):
    qa = fg.shiftquant(torch.randn(4, 64, device=device))
    bad = sq.ShiftQuantTensor(qa.codes, qa.scale, qa.shifts + 20, 8, 64)
    with pytest.raises(ValueError, match="shifts must be in 0..=15"):
        fg.shiftquant_matmul(qa, bad)
    short = sq.ShiftQuantTensor(qa.codes, qa.scale[:2], qa.shifts, 8, 64)
    with pytest.raises(ValueError, match="inconsistent"):
        fg.shiftquant_matmul(qa, short)
    wide = sq.ShiftQuantTensor(qa.codes, qa.scale.double(), qa.shifts, 8, 64)
    with pytest.raises(TypeError, match="b_q.scale must be torch.float32"):
        fg.shiftquant_matmul(qa, wide)


@needs_cuda
def test_operands_on_two_devices_are_refused():
    qa = fg.shiftquant(torch.randn(4, 64, device="cuda"))
    qb = fg.shiftquant(torch.randn(3, 64))
    with pytest.raises(ValueError, match="shiftquant_matmul: a_q is on cuda"):
        fg.shiftquant_matmul(qa, qb)
    layer = fg.nn.ShiftQuantLinear(64, 8)
    with pytest.raises(ValueError, match="shiftquant_linear: weight is on cpu"):
        layer(torch.randn(2, 64, device="cuda"))


# ---- the CUDA GEMM's fragments, emulated on the CPU ----


def test_the_emulation_uses_the_kernels_index_expressions():
    source = KERNEL.read_text(encoding="utf-8")
    for name, expression in KERNEL_INDEX.items():
        assert expression in source, f"{name}: {expression!r} is not in {KERNEL.name}"


@pytest.mark.parametrize(
    "m, n, k, group_size, bias",
    [
        (20, 136, 192, 64, True),  # N crosses a block, K ends mid-stage
        (130, 40, 100, 48, False),  # M crosses a block; groups padded 48 -> 64, short last group
        (33, 17, 96, 32, True),  # one group per mma step
        (9, 24, 72, 12, False),  # groups padded 12 -> 32
    ],
)
def test_emulated_gemm_equals_the_float64_product(m, n, k, group_size, bias):
    a, b = sample((m, k), 1), sample((n, k), 2)
    qa = fg.shiftquant(a, bits=8, group_size=group_size)
    qb = fg.shiftquant(b, bits=5, group_size=group_size)
    ops = [sq_cuda.gemm_operand(q.codes, q.scale, q.shifts, q.group_size) for q in (qa, qb)]
    assert all(op.k % 32 == 0 and op.group_size % 32 == 0 for op in ops)
    c = torch.randn(n) if bias else None
    got = emulate_gemm(*ops, c)
    da, db = dequantized(qa), dequantized(qb)
    want = da @ db.T
    bound = da.abs() @ db.abs().T
    if c is not None:
        want, bound = want + c.double(), bound + c.double().abs()
    assert ((got.double() - want).abs() <= 1e-5 * bound + 1e-30).all()


def test_gemm_operand_padding_keeps_every_value():
    q = fg.shiftquant(sample((5, 100), 3), bits=6, group_size=20)
    op = sq_cuda.gemm_operand(q.codes, q.scale, q.shifts, q.group_size)
    assert (op.k, op.group_size) == (5 * 32, 32)
    unpadded = op.codes.view(5, 5, 32)[:, :, :20].reshape(5, 100)
    assert torch.equal(unpadded, q.codes)
    assert (op.codes.view(5, 5, 32)[:, :, 20:] == 0).all()
    assert op.shifts_t.shape == (5, 16) and torch.equal(op.shifts_t[:, :5], q.shifts.T)


@pytest.mark.parametrize("group_size", [4, 12, 32, 64, 128, 1024])
def test_rows_plan(group_size):
    threads, lanes = sq_cuda.rows_plan(4096, group_size)
    assert threads % 32 == 0 and threads <= 256
    assert lanes & (lanes - 1) == 0 and lanes <= min(32, group_size // 4)
    assert sq_cuda.rows_plan(10, group_size)[0] == 32


# ---- the ops under opcheck and torch.compile ----


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("seed", [None, 7])
def test_quantize_opcheck(device, transposed, seed):
    x = sample((6, 70), 1).to(device)
    key = None if seed is None else sq.seed_tensor(seed)
    torch.library.opcheck(sq.quantize_op, (x, 5, 16, key, transposed))


def test_dequantize_opcheck(device):
    q = fg.shiftquant(sample((2, 3, 70), 2).to(device), 6, 16)
    torch.library.opcheck(sq.dequantize_op, (q.codes, q.scale, q.shifts, 16))


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matmul_opcheck(device, bias, dtype):
    qa = fg.shiftquant(sample((5, 96), 3).to(device), 8, 32)
    qb = fg.shiftquant(sample((7, 96), 4).to(device), 6, 32)
    c = torch.randn(7, device=device) if bias else None
    args = (qa.codes, qa.scale, qa.shifts, qb.codes, qb.scale, qb.shifts, 32, c, dtype)
    torch.library.opcheck(sq.matmul_op, args)


@pytest.mark.parametrize("bias", [False, True])
def test_linear_opcheck(device, bias):
    x = sample((3, 4, 64), 5).to(device).requires_grad_()
    w = sample((24, 64), 6).to(device).requires_grad_()
    b = torch.randn(24, device=device, requires_grad=True) if bias else None
    torch.library.opcheck(sq.linear_op, (x, w, b, 8, 6, 32))
    grad = torch.randn(3, 4, 24, device=device)
    args = (grad, x.detach(), w.detach(), 8, 6, 32, sq.seed_tensor(11))
    torch.library.opcheck(sq.linear_backward_op, args)
    for mask in ([True, False, False], [False, True, bias]):  # only some gradients
        torch.library.opcheck(sq.linear_backward_op, (*args, None, mask))
    # With the weight's codes made beforehand (ShiftQuantLinear's cache).
    codes = sq.weight_operand(w, 8, 32) + sq.weight_operand(w, 8, 32, transposed=True)
    torch.library.opcheck(sq.linear_op, (x, w, b, 8, 6, 32, None, codes))
    torch.library.opcheck(sq.linear_backward_op, (*args, codes[4:]))


def test_compiled_quantize_and_matmul_equal_eager(device):
    def product(a, b):
        qa = fg.shiftquant(a, bits=6, group_size=32)
        qb = fg.shiftquant(b, bits=4, group_size=32, rounding="stochastic", seed=3)
        return fg.shiftquant_matmul(qa, qb), qb.dequantize()

    torch._dynamo.reset()
    compiled = torch.compile(product, fullgraph=True)
    a, b = sample((2, 5, 96), 7).to(device), sample((9, 96), 8).to(device)
    for got, want in zip(compiled(a, b), product(a, b), strict=True):
        assert torch.equal(got, want)


def test_compiled_shiftquant_linear_equals_eager(device):
    """Outputs and gradients; the backward's stochastic rounding draws its seed from torch's
    generator, which the compiled graph reads as eager does with fallback_random."""
    torch.manual_seed(3)
    layer = fg.nn.ShiftQuantLinear(96, 40, bits=6, grad_bits=5, group_size=32).to(device)
    x = sample((3, 7, 96), 9).to(device)
    grad = torch.randn(3, 7, 40, device=device)

    def run(module):
        xi = x.clone().requires_grad_()
        layer.zero_grad(set_to_none=True)
        torch.manual_seed(4)
        y = module(xi)
        y.backward(grad)
        return y.detach(), xi.grad, layer.weight.grad, layer.bias.grad

    torch._dynamo.reset()
    want = run(layer)
    with torch._inductor.config.patch(fallback_random=True):
        got = run(torch.compile(layer, fullgraph=True))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


def test_quantize_model_keeps_shared_modules_shared():
    shared, norm = torch.nn.Linear(8, 8), torch.nn.LayerNorm(8)
    model = torch.nn.Sequential(
        shared, norm, torch.nn.ReLU(), shared, torch.nn.Sequential(shared, norm)
    )
    out = fg.nn.quantize_model(model)
    assert out is model
    assert isinstance(model[0], fg.nn.ShiftQuantLinear)
    assert model[0] is model[3] is model[4][0]
    assert isinstance(model[1], fg.nn.L1LayerNorm) and model[1] is model[4][1]
    assert len(list(model.parameters())) == 4  # one weight and bias each, shared
    assert torch.equal(model[0].weight, shared.weight)


def test_quantize_model_swaps_in_the_same_parameters():
    """The swapped layers hold the original Parameters, not copies: a head tied to the
    embedding stays tied, and an optimizer made before the swap trains the new layers."""

    class Tied(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(50, 16)
            self.lin, self.norm = torch.nn.Linear(16, 16), torch.nn.LayerNorm(16)
            self.head = torch.nn.Linear(16, 50, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.head(self.norm(self.lin(self.emb(ids))))

    torch.manual_seed(0)
    model = Tied()
    before = {name: p for name, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    fg.nn.quantize_model(model)
    assert isinstance(model.head, fg.nn.ShiftQuantLinear) and model.head.weight is model.emb.weight
    after = dict(model.named_parameters())
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    for name in ("lin", "norm"):
        assert all(p.device.type == "cpu" for p in getattr(model, name).parameters()), name
    start = {name: p.detach().clone() for name, p in before.items()}
    model(torch.randint(0, 50, (6,))).sum().backward()
    opt.step()
    assert all(not torch.equal(start[name], p) for name, p in before.items())
    # a parametrized weight is computed: the swap holds a copy of its value
    lin = torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(8, 4))
    out = fg.nn.quantize_model(torch.nn.Sequential(lin))[0]
    assert torch.equal(out.weight, lin.weight) and out.weight is not lin.weight
    # from_linear copies unless asked to share
    plain = torch.nn.Linear(8, 4)
    assert fg.nn.ShiftQuantLinear.from_linear(plain).weight is not plain.weight


def test_copies_of_frozen_layers_stay_frozen():
    """A copy takes each parameter's requires_grad (a frozen layer's copy was trainable)."""
    linear, norm, rms = torch.nn.Linear(8, 4), torch.nn.LayerNorm(8), torch.nn.RMSNorm(8)
    linear.weight.requires_grad_(False)
    norm.requires_grad_(False)
    rms.requires_grad_(False)
    copies = (
        fg.nn.ShiftQuantLinear.from_linear(linear),
        fg.nn.L1LayerNorm.from_layer_norm(norm),
        fg.nn.L1RMSNorm.from_rms_norm(rms, weight_offset=1.0),
        fg.nn.W4A16Linear.from_linear(linear),  # (its weight is frozen either way)
    )
    for made, source in zip(copies, (linear, norm, rms, linear), strict=True):
        want = {n: p.requires_grad for n, p in source.named_parameters()}
        for name, p in made.named_parameters():
            assert p.requires_grad == want[name], (type(made).__name__, name)


def test_a_parametrized_weight_is_the_one_quantized():
    """The layer reads its registered tensors from the module's dicts; a parametrized weight is a
    property instead (a new tensor per call), and must be what each call quantizes, also where
    the layer keeps codes between calls."""
    from torch.nn.utils import parametrize

    class Doubled(torch.nn.Module):
        def forward(self, w):
            return 2 * w

    torch.manual_seed(0)
    layer = fg.nn.ShiftQuantLinear(64, 32)
    plain = fg.nn.ShiftQuantLinear(64, 32, cache_weight_codes=False)
    parametrize.register_parametrization(layer, "weight", Doubled())
    x = torch.randn(8, 64)
    for _ in range(3):
        with torch.no_grad():
            plain.weight.copy_(layer.weight)  # the parametrized (doubled) weight
            plain.bias.copy_(layer.bias)
            torch.testing.assert_close(layer(x), plain(x), rtol=0, atol=0)
            layer.parametrizations.weight.original.mul_(1.5)  # codes must follow
    y = layer(x.requires_grad_())
    y.sum().backward()
    assert layer.parametrizations.weight.original.grad is not None


def test_quantize_model_swaps_a_root_module():
    linear = torch.nn.Linear(8, 8)
    out = fg.nn.quantize_model(linear, bits=6)
    assert isinstance(out, fg.nn.ShiftQuantLinear) and out.bits == 6
    assert torch.equal(out.weight, linear.weight) and torch.equal(out.bias, linear.bias)
    assert isinstance(fg.nn.quantize_model(torch.nn.LayerNorm(8)), fg.nn.L1LayerNorm)
    norm = torch.nn.LayerNorm(8)
    assert fg.nn.quantize_model(norm, norms=False) is norm
    with pytest.raises(TypeError, match="quantize_model: model must be an nn.Module"):
        fg.nn.quantize_model(None)


def test_an_empty_last_dim_gives_torchs_empty_results():
    q = fg.shiftquant(torch.randn(3, 0))
    assert q.codes.shape == (3, 0) and q.scale.shape == (3,) and q.shifts.shape == (3, 0)
    assert q.dequantize().shape == (3, 0)
    a, b = fg.shiftquant(torch.randn(2, 3, 0)), fg.shiftquant(torch.randn(4, 0))
    assert torch.equal(fg.shiftquant_matmul(a, b), torch.zeros(2, 3, 4))
    layer = fg.nn.ShiftQuantLinear(0, 2)
    plain = torch.nn.Linear(0, 2)
    with torch.no_grad():
        layer.bias.copy_(torch.tensor([0.5, -1.5]))
        plain.bias.copy_(layer.bias)
    x, x_plain = (torch.randn(5, 0, requires_grad=True) for _ in range(2))
    y, y_plain = layer(x), plain(x_plain)
    torch.testing.assert_close(y, y_plain)
    y.sum().backward()
    y_plain.sum().backward()
    assert x.grad.shape == (5, 0) and layer.weight.grad.shape == (2, 0)
    torch.testing.assert_close(layer.bias.grad, plain.bias.grad)
    half = layer(torch.randn(5, 0, dtype=torch.bfloat16))
    assert half.dtype == torch.bfloat16 and torch.equal(half, y.detach().bfloat16())


def test_scale_products_beyond_float32_keep_finite_results(device):
    """The row scales' product may overflow float32 where the result does not: an exact 0 must
    not come back as 0 * inf = NaN (the epilogues multiply the scales in double)."""
    a = fg.shiftquant(torch.tensor([[0.0, 0.0, 37.9]], device=device), bits=2)
    b = fg.shiftquant(torch.tensor([[-3.4e38, 0.0, 0.0], [1e30, 0.0, 1e30]], device=device), bits=6)
    got = fg.shiftquant_matmul(a, b).cpu()
    want = (a.dequantize().double() @ b.dequantize().double().T).float().cpu()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    assert torch.isfinite(got[0, 0]) and got[0, 0] == 0


def test_linear_refuses_second_derivatives():
    layer = fg.nn.ShiftQuantLinear(64, 32)
    x = torch.randn(8, 64, requires_grad=True)
    with pytest.raises(NotImplementedError, match="shiftquant_linear: a second derivative"):
        torch.autograd.grad(layer(x).sum(), x, create_graph=True)
