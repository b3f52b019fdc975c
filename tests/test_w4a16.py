"""W4 quantization, the W4A16 matmul, W4A16Linear and SmoothQuant+ against plain torch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ferrograd as fg
from ferrograd.quant import smoothquant as sq
from ferrograd.quant.w4 import unpack_torch

pytestmark = pytest.mark.simd


def reference_w4(w: torch.Tensor, group_size: int, zero_point: bool):
    """DESIGN.md's rule in plain torch: (codes, scale per column, zero per column, w_hat)."""
    w = w.float()
    n, k = w.shape
    g = k if group_size == -1 else group_size
    codes, scales, zeros = torch.empty(n, k), torch.empty(n, k), torch.empty(n, k)
    for c0 in range(0, k, g):
        block = w[:, c0 : c0 + g]
        if zero_point:
            scale = (block.amax(1, keepdim=True) - block.amin(1, keepdim=True)) / 15
            scale = torch.where(scale == 0, torch.ones_like(scale), scale)
            zero = torch.clamp(torch.round(-block.amin(1, keepdim=True) / scale), 0, 15)
            q = torch.clamp(torch.round(block / scale) + zero, 0, 15)
        else:
            scale = block.abs().amax(1, keepdim=True) / 7
            scale = torch.where(scale == 0, torch.ones_like(scale), scale)
            zero = torch.zeros_like(scale)
            q = torch.clamp(torch.round(block / scale), -8, 7)
        codes[:, c0 : c0 + g] = q
        scales[:, c0 : c0 + g] = scale
        zeros[:, c0 : c0 + g] = zero
    return codes, scales, zeros


SHAPES = [(8, 64), (37, 100), (16, 256), (5, 1000), (3, 33)]
GROUPS = [32, 64, 128, -1, 48]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("zero_point", [True, False])
def test_codes_and_dequantization_follow_the_rule(shape, group_size, zero_point):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    w[0, : min(shape[1], 40)] = 0.0  # a zero group (scale 1, exact zeros)
    q = fg.quant.quantize_w4(w, group_size, zero_point)
    codes, scales, zeros = reference_w4(w, group_size, zero_point)
    assert q.codes.dtype == (torch.uint8 if zero_point else torch.int8)
    assert torch.equal(q.codes.float(), codes)
    # dequantize() uses the stored (float16) scale; the zero is exact.
    stored = scales.half().float()
    torch.testing.assert_close(q.dequantize(), (codes - zeros) * stored, rtol=0, atol=0)
    assert q.dequantize().shape == w.shape
    assert (q.zeros is None) == (not zero_point)


@pytest.mark.parametrize("k", [33, 64, 100, 1000])
def test_pack_unpack_round_trip(k):
    w = torch.randn(7, k)
    q = fg.quant.quantize_w4(w, 32)
    assert q.packed.shape == (7, -(-k // 64) * 32)
    stored = q.stored_codes()
    assert torch.equal(unpack_torch(q.packed, k), stored)  # the torch path other devices use
    assert int(stored.max()) <= 15


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_scale_dtype_follows_the_weight(dtype):
    q = fg.quant.quantize_w4(torch.randn(4, 64).to(dtype), 32)
    assert q.scales.dtype == (torch.bfloat16 if dtype == torch.bfloat16 else torch.float16)
    assert q.dequantize().dtype == dtype


def integer_gemv() -> bool:
    """Whether the GEMV runs x rounded to int16 (VNNI on AVX-512, vpmaddubsw on AVX2)."""
    level = fg.simd_level()
    return level == "avx2" or (level == "avx512" and fg.cpu_info()["features"]["avx512vnni"])


@pytest.mark.parametrize("rows", [1, 3, 4, 5, 8, 16, 17, 40])
@pytest.mark.parametrize(
    "group_size, zero_point", [(128, True), (32, False), (-1, True), (48, True)]
)
def test_matmul_matches_the_dequantized_weight(rows, group_size, zero_point):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(70, 256, generator=g)
    q = fg.quant.quantize_w4(w, group_size, zero_point)
    x = torch.randn(rows, 256, generator=g)
    bias = torch.randn(70, generator=g)
    want = x.double() @ q.dequantize().double().T + bias.double()
    got = fg.w4a16_matmul(x, q, bias)
    err = (got.double() - want).abs().max() / want.abs().max()
    # The integer kernels round x to 16-bit integers per row (2^-15 of the row's max |x|).
    assert err < (1e-4 if integer_gemv() else 1e-5)


@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("group_size", [32, 128, 512, -1])
def test_matmul_error_stays_within_the_x_rounding_bound(rows, group_size):
    """Per element: |error| <= max|x_i| * 2^-16 * sum_c |W_hat[r, c]| (x rounded to a step of
    max|x_i| / 32639), plus float32 rounding; an outlier makes the small entries' rounding count."""
    g = torch.Generator().manual_seed(11)
    n, k = 40, 1024
    q = fg.quant.quantize_w4(torch.randn(n, k, generator=g), group_size)
    x = torch.randn(rows, k, generator=g)
    x[:, 3] = 50.0
    w_hat = q.dequantize().double()
    want = x.double() @ w_hat.T
    step = x.abs().amax(1, keepdim=True).double() / 32639
    bound = step / 2 * w_hat.abs().sum(1) + 1e-6 * (x.double().abs() @ w_hat.abs().T)
    got = fg.w4a16_matmul(x, q).double()
    assert ((got - want).abs() <= bound).all()
    if not integer_gemv():
        assert ((got - want).abs() <= 1e-6 * (x.double().abs() @ w_hat.abs().T)).all()


def test_nan_in_x_reaches_only_its_row():
    q = fg.quant.quantize_w4(torch.randn(8, 64), 32)
    x = torch.randn(3, 64)
    x[1, 5] = float("nan")
    y = fg.w4a16_matmul(x, q)
    assert y[1].isnan().all() and not y[[0, 2]].isnan().any()
    x[1, 5] = float("inf")
    y = fg.w4a16_matmul(x, q)
    assert not y[1].isfinite().any() and y[[0, 2]].isfinite().all()


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_half_inputs_and_leading_shapes(dtype, tol):
    w = torch.randn(48, 128)
    q = fg.quant.quantize_w4(w.to(dtype), 64)
    x = torch.randn(2, 3, 128).to(dtype)
    got = fg.w4a16_matmul(x, q)
    assert got.shape == (2, 3, 48) and got.dtype == dtype
    want = x.double() @ q.dequantize().double().T
    assert (got.double() - want).abs().max() / want.abs().max() < tol


@pytest.mark.parametrize("rows", [2, 40])
def test_gradients_reach_the_input_and_bias(rows):
    q = fg.quant.quantize_w4(torch.randn(30, 96), 32)
    x = torch.randn(rows, 96, requires_grad=True)
    bias = torch.randn(30, requires_grad=True)
    dy = torch.randn(rows, 30)
    fg.w4a16_matmul(x, q, bias).backward(dy)
    torch.testing.assert_close(x.grad, dy @ q.dequantize(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bias.grad, dy.sum(0))


def test_w4a16_linear_from_linear_smooth_to_and_state_dict():
    torch.manual_seed(0)
    linear = nn.Linear(128, 40)
    s = torch.rand(128) + 0.5
    layer = fg.nn.W4A16Linear.from_linear(linear, group_size=64, smooth=s)
    x = torch.randn(6, 128)
    q = fg.quant.quantize_w4(linear.weight.detach() * s, 64)
    want = (x / s) @ q.dequantize().T + linear.bias
    torch.testing.assert_close(layer(x), want, rtol=1e-4, atol=1e-4)
    x.requires_grad_()
    layer(x).sum().backward()
    assert x.grad is not None and layer.bias.grad is not None
    copy = fg.nn.W4A16Linear.from_linear(nn.Linear(128, 40), group_size=64, smooth=s)
    copy.load_state_dict(layer.state_dict())
    torch.testing.assert_close(copy(x), layer(x))
    assert "group_size=64" in repr(layer)
    assert layer.to(torch.device("cpu")).weight.device.type == "cpu"


class Block(nn.Module):
    """Pre-norm: q/k/v read one LayerNorm, up/gate another (RMSNorm), down reads an activation."""

    def __init__(self, dim: int = 64, hidden: int = 128) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.q, self.k, self.v = (nn.Linear(dim, dim) for _ in range(3))
        self.o = nn.Linear(dim, dim)
        self.norm2 = nn.RMSNorm(dim)
        self.up, self.gate = nn.Linear(dim, hidden), nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)

    def forward(self, x):
        h = self.norm1(x)
        att = torch.softmax(self.q(h) @ self.k(h).transpose(-1, -2) / 8, -1) @ self.v(h)
        x = x + self.o(att)
        h = self.norm2(x)
        return x + self.down(torch.nn.functional.silu(self.gate(h)) * self.up(h))


class PostNorm(Block):
    """The norm's output is also the residual: folding 1/s into it would change the model."""

    def forward(self, x):
        h = self.norm1(x)
        return h + self.o(self.q(h))


def outlier_batches(dim: int = 64, count: int = 4):
    g = torch.Generator().manual_seed(3)
    batches = []
    for _ in range(count):
        x = torch.randn(2, 16, dim, generator=g)
        x[..., :4] *= 40.0  # planted outlier channels (they survive the norms' affine weights)
        batches.append(x)
    return batches


def planted_block(cls=Block) -> nn.Module:
    torch.manual_seed(0)
    model = cls()
    with torch.no_grad():
        for norm in (model.norm1, model.norm2):
            norm.weight[:4] = 30.0  # the norms pass the outliers on, as in real LLMs
    return model


def test_folding_is_exact_only_when_the_norm_feeds_linears_alone():
    batches = outlier_batches()
    for cls, exact in ((Block, True), (PostNorm, False)):
        model = planted_block(cls)
        calib = sq._Calibration(model)
        reference = calib.run(model, batches)
        assert sq._folding_is_exact(model, calib, batches[0], reference[0]) is exact


def test_calibration_groups_linears_by_the_norm_they_read():
    model = planted_block()
    calib = sq._Calibration(model)
    calib.run(model, outlier_batches())
    groups = {norm or names[0]: sorted(names) for norm, names in calib.groups()}
    assert groups == {
        "norm1": ["k", "q", "v"],
        "norm2": ["gate", "up"],
        "o": ["o"],
        "down": ["down"],
    }


def test_smoothquant_plus_beats_round_to_nearest_on_planted_outliers():
    batches = outlier_batches()
    model = planted_block()
    with torch.no_grad():
        reference = [model(b) for b in batches]
    rtn = planted_block()
    for name in ("q", "k", "v", "o", "up", "gate", "down"):
        setattr(rtn, name, fg.nn.W4A16Linear.from_linear(getattr(rtn, name), group_size=64))
    report = fg.quant.smoothquant_plus(model, batches, group_size=64)
    assert report.folded
    assert all(isinstance(getattr(model, n), fg.nn.W4A16Linear) for n in ("q", "o", "down"))
    assert report.layers["q"].folded_into == "norm1" and report.layers["o"].folded_into is None
    assert set(report.alpha_losses) == set(sq.ALPHA_GRID)
    assert report.alpha_losses[report.alpha] == min(report.alpha_losses.values())

    def loss(m):
        with torch.no_grad():
            num = sum(
                float((m(b) - r).pow(2).sum()) for b, r in zip(batches, reference, strict=True)
            )
        return num / sum(float(r.pow(2).sum()) for r in reference)

    assert loss(model) < 0.7 * loss(rtn)
    torch.testing.assert_close(loss(model), report.alpha_losses[report.alpha], rtol=1e-4, atol=0)
    assert report.rtn_loss > loss(model)


def test_smoothquant_plus_keeps_input_scales_when_folding_is_inexact():
    model = planted_block(PostNorm)
    report = fg.quant.smoothquant_plus(model, outlier_batches(), group_size=64, alpha=0.5)
    assert not report.folded and report.alpha == 0.5
    assert model.q.input_scale is not None
    assert all(layer.folded_into is None for layer in report.layers.values())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group_size, zero_point", [(32, True), (64, False), (-1, True)])
def test_cuda_kernel_decomposition_emulated(dtype, group_size, zero_point):
    """kernels/w4a16.cu's blocks, warps, lanes, fragments and split-K, run in torch: equal to
    x @ W_hat.T with W_hat rounded to x's dtype (what the kernel feeds the tensor cores)."""
    from ferrograd.ops import w4a16_cuda as cu

    g = torch.Generator().manual_seed(1)
    m, n, k = 20, 136, 128  # two blocks of rows and of columns, four K steps (split four ways)
    q = fg.quant.quantize_w4(torch.randn(n, k, generator=g), group_size, zero_point)
    scales, zeros = (t.to(dtype) if t.is_floating_point() else t for t in q.kernel_params())
    qweight = cu.pack_gpu(q.stored_codes())
    assert qweight.dtype == torch.int32 and qweight.shape == (n, k // 8)
    x = torch.randn(m, k, generator=g).to(dtype)
    got = cu.emulate(x, qweight, scales, zeros, group_size)
    per_column = torch.arange(k) // (k if group_size == -1 else group_size)
    w_hat = (q.stored_codes().float() - zeros[:, per_column].float()) * scales[
        :, per_column
    ].float()
    want = x.double() @ w_hat.to(dtype).double().T
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    assert cu.launch_plan(m, n, k) == ((2, 2, 4), 1)
    assert cu.supports(k, group_size) and not cu.supports(96 + 8, 32)


def test_bad_input():
    with pytest.raises(ValueError, match="quantize_w4: weight holds NaN"):
        fg.quant.quantize_w4(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="quantize_w4: weight must be a non-empty 2-D"):
        fg.quant.quantize_w4(torch.ones(8))
    with pytest.raises(ValueError, match="quantize_w4: group_size must be positive or -1"):
        fg.quant.quantize_w4(torch.ones(2, 8), group_size=0)
    with pytest.raises(TypeError, match="quantize_w4: weight must be a floating"):
        fg.quant.quantize_w4(torch.ones(2, 8, dtype=torch.int32))
    q = fg.quant.quantize_w4(torch.randn(4, 64))
    with pytest.raises(ValueError, match=r"w4a16_matmul: x must have shape \[..., K\] with K = 64"):
        fg.w4a16_matmul(torch.ones(2, 63), q)
    with pytest.raises(TypeError, match="w4a16_matmul: w must be a W4Weight"):
        fg.w4a16_matmul(torch.ones(2, 64), torch.ones(4, 64))
    with pytest.raises(ValueError, match="w4a16_matmul: bias must have shape"):
        fg.w4a16_matmul(torch.ones(2, 64), q, torch.ones(5))
    with pytest.raises(ValueError, match="smoothquant_plus: alpha must be"):
        fg.quant.smoothquant_plus(planted_block(), outlier_batches(), alpha=1.5)
    with pytest.raises(ValueError, match="smoothquant_plus: calibration_batches yielded no"):
        fg.quant.smoothquant_plus(planted_block(), [])
