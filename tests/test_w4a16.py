"""W4 quantization, the W4A16 matmul, W4A16Linear and SmoothQuant+ against plain torch, on the
CPU and (where present) a GPU; kernels/w4a16.cu's decomposition emulated on the CPU; the ops
under opcheck and torch.compile."""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch
from support.w4a16_emulation import emulate
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import ferrograd as fg
from ferrograd import _core
from ferrograd.ops import w4a16 as ops
from ferrograd.ops.w4a16 import cuda as w4_cuda
from ferrograd.ops.w4a16 import reference
from ferrograd.ops.w4a16.cpu import _gemm_min_rows
from ferrograd.ops.w4a16.weight import (
    CPU_BLOCKS,
    GPU_WORDS,
    LAYOUTS,
    kernel_zeros,
    native_layout,
    pack,
    scale_dtype,
)
from ferrograd.quant import smoothquant as sq

pytestmark = pytest.mark.simd


def reference_w4(w: torch.Tensor, group_size: int, zero_point: bool):
    """docs/definitions.md's W4 rule in plain torch: (codes, scale per column, zero per column,
    w_hat)."""
    w = w.float()
    n, k = w.shape
    g = k if group_size == -1 else group_size
    codes, scales, zeros = torch.empty(n, k), torch.empty(n, k), torch.empty(n, k)
    for c0 in range(0, k, g):
        block = w[:, c0 : c0 + g]
        if zero_point:
            # The range widened to hold 0.
            lo = block.amin(1, keepdim=True).clamp(max=0)
            scale = (block.amax(1, keepdim=True).clamp(min=0) - lo) / 15
            scale = torch.where(scale == 0, torch.ones_like(scale), scale)
            zero = torch.clamp(torch.round(-lo / scale), 0, 15)
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
def test_rust_quantizer_writes_the_cpu_layout(k):
    w = torch.randn(7, k)
    q = fg.quant.quantize_w4(w, 32)
    assert q.packed.shape == (7, -(-k // 64) * 32)
    stored = q.stored_codes()  # torch ops, as on every device
    assert torch.equal(pack(stored, CPU_BLOCKS), q.packed)  # padding nibbles 0
    assert torch.equal(q.packed, reference.quantize(w, 32, True)[0])
    assert int(stored.max()) <= 15


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("zero_point", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])  # read as they are
def test_rust_quantizer_equals_the_reference(shape, group_size, zero_point, dtype):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(5)).to(dtype)
    w[1, :7] = 0.0
    got = ops.w4_quantize_op(w, group_size, zero_point)
    for a, b in zip(got, reference.quantize(w, group_size, zero_point), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_weight_is_an_immutable_value_with_named_layouts():
    q = fg.quant.quantize_w4(torch.randn(9, 80), 32, zero_point=False)
    assert q.layout == CPU_BLOCKS
    with pytest.raises(dataclasses.FrozenInstanceError):
        q.packed = q.packed
    words = q.with_layout(GPU_WORDS)
    assert q.layout == CPU_BLOCKS and words.layout == GPU_WORDS
    assert words.packed.dtype == torch.int32 and words.packed.shape == (9, 10)
    codes = q.stored_codes()
    for i in range(8):  # word j holds columns 8j .. 8j + 7 in nibbles 0 .. 7
        assert torch.equal((words.packed >> (4 * i)) & 15, codes[:, i::8].int())
    assert torch.equal(words.stored_codes(), codes)
    assert torch.equal(words.dequantize(), q.dequantize())
    assert torch.equal(words.with_layout(CPU_BLOCKS).packed, q.packed)
    x = torch.randn(4, 80)
    torch.testing.assert_close(fg.w4a16_matmul(x, words), x @ q.dequantize().T)  # reference
    assert q.to("cpu") is q and q.to("meta").layout == native_layout("meta") == CPU_BLOCKS


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_scale_dtype_follows_the_weight(dtype):
    q = fg.quant.quantize_w4(torch.randn(4, 64).to(dtype), 32)
    assert q.scales.dtype == (torch.bfloat16 if dtype == torch.bfloat16 else torch.float16)
    assert q.dequantize().dtype == dtype


def column_scales(q) -> torch.Tensor:
    """The stored scale of each weight [N, K], as float32."""
    per_column = torch.arange(q.shape[1]) // q.group_len
    return q.scales.float()[:, per_column]


@pytest.mark.parametrize("magnitude", [5e5, 1e-8, 1e30, 1e-30])
@pytest.mark.parametrize("zero_point", [True, False])
def test_scales_outside_the_16_bit_range_are_stored_in_float32(magnitude, zero_point):
    """Scales float16 cannot hold (overflow above ~5e5 weights, flush below ~1e-7) keep the
    rule's float32 scale: every weight within one step of the rule."""
    w = torch.randn(6, 256, generator=torch.Generator().manual_seed(7)) * magnitude
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        if not torch.isfinite(w.to(dtype)).all() or (w.to(dtype) == 0).all():
            continue  # not representable in that dtype
        q = fg.quant.quantize_w4(w.to(dtype), 64, zero_point)
        wf = w.to(dtype).float()
        codes, scales, zeros = reference_w4(wf, 64, zero_point)
        assert torch.equal(q.codes.float(), codes)
        fits = bool(((scales >= 6.2e-5) & (scales <= 65504)).all()) or dtype == torch.bfloat16
        assert q.scales.dtype == (scale_dtype(dtype) if fits else torch.float32)
        w_hat = q.dequantize().float()
        assert w_hat.isfinite().all()
        assert ((w_hat - wf).abs() <= column_scales(q) * 1.001).all()


@pytest.mark.parametrize("zero_point", [True, False])
def test_scale_storage_is_16_bit_only_when_every_scale_fits(zero_point):
    w = torch.randn(4, 128, generator=torch.Generator().manual_seed(1))
    assert fg.quant.quantize_w4(w, 64, zero_point).scales.dtype == torch.float16
    w[2, 64:] *= 1e6  # one group's scale past float16's range
    q = fg.quant.quantize_w4(w, 64, zero_point)
    assert q.scales.dtype == torch.float32
    codes, scales, zeros = reference_w4(w, 64, zero_point)
    torch.testing.assert_close(q.dequantize(), (codes - zeros) * scales, rtol=0, atol=0)


@pytest.mark.parametrize(
    "row",
    [
        [1.0, 1.0000001] * 64,  # near-constant
        [2.5] * 128,  # constant
        [-3.0] * 128,
        torch.linspace(10, 11, 128).tolist(),  # a group that does not hold 0
        torch.linspace(-11, -10, 128).tolist(),
    ],
)
def test_groups_without_zero_dequantize_near_their_values(row):
    w = torch.tensor([row])
    for group_size in (-1, 32):
        q = fg.quant.quantize_w4(w, group_size)
        step = column_scales(q)
        assert ((q.dequantize() - w).abs() <= 0.5 * step * 1.001).all()
        assert (q.dequantize() - w).abs().max() < w.abs().max() / 15


def test_dequantize_saturates_at_the_dtypes_largest_value():
    """Fuzz finding: float16 weights near 65504 dequantized to inf (66936 > 65504 here: the
    group's step is 8367 and the largest code lands past the range)."""
    w = torch.tensor([[-60000.0, 65504.0] * 16], dtype=torch.float16)
    q = fg.quant.quantize_w4(w, 32)
    w_hat = q.dequantize()
    assert w_hat.dtype == torch.float16 and bool(w_hat.isfinite().all())
    assert torch.equal(w_hat[0, 1::2], torch.full((16,), 65504.0, dtype=torch.float16))
    for dtype in (torch.float32, torch.float64):  # the wide types keep the exact value
        w_hat = fg.quant.quantize_w4(w.to(dtype), 32).dequantize()
        assert w_hat.dtype == dtype and w_hat[0, 1] > 65504


def test_a_range_overflowing_float32_is_refused():
    w = torch.tensor([[-3e38, 0.0, 3e38, 1.0]])
    for fn in (fg.quant.quantize_w4, ops.w4_quantize_op, reference.quantize):
        with pytest.raises(ValueError, match="quantize_w4: weight"):
            fn(w, -1, True)
    # Each group alone fits, and the symmetric scheme's max |w| / 7 always does.
    q = fg.quant.quantize_w4(w, 2)
    assert q.scales.dtype == torch.float32 and q.dequantize().isfinite().all()
    assert fg.quant.quantize_w4(w, -1, zero_point=False).dequantize().isfinite().all()


@pytest.mark.parametrize("zero_point", [True, False])
def test_rust_quantizer_equals_the_reference_on_extreme_weights(zero_point):
    g = torch.Generator().manual_seed(9)
    w = torch.randn(7, 200, generator=g)
    w[0] *= 5e5
    w[1] *= 1e-8
    w[2] = torch.linspace(10, 11, 200)
    w[3, :100] = 1.0000001
    w[3, 100:] = 1.0
    w[4] *= 1e-40  # float32 subnormals
    w[5] = 3e38
    w[6] = torch.randint(-3, 4, (200,), generator=g) * 2.0**-149  # range / 15 underflows
    for group_size in (64, -1, 48):
        got = ops.w4_quantize_op(w, group_size, zero_point)
        for a, b in zip(got, reference.quantize(w, group_size, zero_point), strict=True):
            assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("rows", [1, 3, 16, 40])
@pytest.mark.parametrize("zero_point", [True, False])
def test_huge_x_gives_finite_results_where_the_exact_one_is(rows, zero_point):
    """x = 1e38 against a zero weight is 0, and against a row summing to a finite product
    finite: the kernels' zero-point term (scale * zero * sum x) must not overflow into NaN."""
    w = torch.zeros(4, 64)
    w[1, 0] = 1.0
    w[2, :2] = torch.tensor([1.0, -1.0])
    w[3] = torch.randn(64)
    q = fg.quant.quantize_w4(w, 32, zero_point)
    x = torch.full((rows, 64), 1e38)
    y = fg.w4a16_matmul(x, q)
    w_hat = q.dequantize().double()
    exact = x.double() @ w_hat.T
    assert (y[:, 0] == 0).all()
    finite = exact.abs() <= torch.finfo(torch.float32).max
    assert finite[:, :3].all() and y[finite].isfinite().all()
    size = x.double().abs() @ w_hat.abs().T  # the error bound's scale (x rounded to int16)
    assert ((y.double() - exact).abs()[finite] <= 1e-4 * size[finite]).all()


def test_weight_fields_of_the_wrong_type_are_type_errors_naming_the_field():
    q = fg.quant.quantize_w4(torch.randn(4, 64), 32)
    bad = {
        "packed": q.packed.to(torch.int64),
        "scales": q.scales.double(),
        "zeros": q.zeros.to(torch.int32),
    }
    for field, value in bad.items():
        with pytest.raises(TypeError, match=f"W4Weight: {field} must be a tensor of dtype"):
            dataclasses.replace(q, **{field: value})
    with pytest.raises(TypeError, match="W4Weight: scales must be a tensor"):
        dataclasses.replace(q, scales=q.scales.tolist())
    with pytest.raises(TypeError, match="W4Weight: group_size must be an int"):
        dataclasses.replace(q, group_size=32.0)
    with pytest.raises(TypeError, match="W4Weight: dtype must be a floating"):
        dataclasses.replace(q, dtype=torch.int8)
    with pytest.raises(ValueError, match=r"W4Weight: scales must be \[4, 2\]"):
        dataclasses.replace(q, scales=q.scales[:, :1])
    with pytest.raises(ValueError, match=r"W4Weight: zeros must be \[4, 2\]"):
        dataclasses.replace(q, zeros=q.zeros.T)
    with pytest.raises(ValueError, match="W4Weight: shape must be"):
        dataclasses.replace(q, shape=(4, 64, 1))
    f32 = dataclasses.replace(q, scales=q.scales.float())  # a float32-scale weight is valid
    torch.testing.assert_close(f32.dequantize(), q.dequantize())


@pytest.mark.parametrize("smooth", [0.0, float("nan"), float("inf"), -1.0])
def test_from_linear_refuses_a_smooth_that_is_not_positive_and_finite(smooth):
    s = torch.rand(64) + 0.5
    s[3] = smooth
    with pytest.raises(ValueError, match="W4A16Linear.from_linear: smooth must be positive"):
        fg.nn.W4A16Linear.from_linear(nn.Linear(64, 8), 32, smooth=s)
    with pytest.raises(TypeError, match="W4A16Linear.from_linear: smooth must be a tensor"):
        fg.nn.W4A16Linear.from_linear(nn.Linear(64, 8), 32, smooth=[1.0] * 64)


def test_w4a16_linear_keeps_its_scales_dtype_through_casts_and_loads():
    """Module casts and loading a checkpoint keep the stored scales (float32 ones would flush
    in float16)."""
    tiny = nn.Linear(64, 8, bias=False)  # (a bias would round through the casts)
    with torch.no_grad():
        tiny.weight.mul_(1e-6)
    layer = fg.nn.W4A16Linear.from_linear(tiny, 32)
    assert layer.scales.dtype == torch.float32
    x = torch.randn(2, 64)
    want = layer(x)
    for cast in (lambda m: m.half(), lambda m: m.to(torch.bfloat16), lambda m: m.float()):
        cast(layer)
        assert layer.scales.dtype == torch.float32 and layer.scales.min() > 0
    torch.testing.assert_close(layer(x), want)
    fresh = fg.nn.W4A16Linear.from_linear(nn.Linear(64, 8, bias=False), 32)
    assert fresh.scales.dtype == torch.float16
    fresh.load_state_dict(layer.state_dict())
    assert fresh.scales.dtype == torch.float32
    torch.testing.assert_close(fresh(x), want)


def integer_gemv() -> bool:
    """Whether the GEMV runs x rounded to int16 (VNNI on AVX-512 with it, vpmaddubsw on AVX2
    and on AVX-512 without it)."""
    return fg.simd_level() != "scalar"


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


@pytest.mark.parametrize("rows", [1, 2, 5, 6, 8, 9, 16, 17, 31, 32, 33, 100, 256])
@pytest.mark.parametrize(
    "n, k, group_size, zero_point",
    [(37, 256, 128, True), (13, 100, -1, False), (70, 320, 64, True), (25, 99, -1, True)],
)
def test_bf16_x_matches_the_dequantized_weight_at_every_row_count(
    rows, n, k, group_size, zero_point
):
    """bf16 x read as it is, through the GEMV (few rows), the AVX-512 BF16 GEMM (more rows,
    where the CPU has it) or the float path: odd N and K tails, one group per row."""
    g = torch.Generator().manual_seed(rows * 7 + n)
    q = fg.quant.quantize_w4(torch.randn(n, k, generator=g), group_size, zero_point)
    x = torch.randn(rows, k, generator=g).bfloat16()
    w_hat = q.dequantize().double()
    want = x.double() @ w_hat.T
    got = fg.w4a16_matmul(x, q)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
    size = x.double().abs() @ w_hat.abs().T
    # The float32 result rounds to bf16 (2^-9); below that, x's int16 rounding in the GEMV.
    assert ((got.double() - want).abs() <= 2**-8 * want.abs() + 1e-4 * size).all()
    y32 = torch.empty(rows, n)
    operands = (q.packed, q.scales.float(), kernel_zeros(q.scales, q.zeros), n, k, group_size)
    if _core.w4_gemm(*operands, x, y32):
        # The GEMM's products of bf16 x and the codes are exact: float32 sums only.
        assert ((y32.double() - want).abs() <= 1e-5 * size).all()


@pytest.mark.simd
@pytest.mark.parametrize("rows", [1, 3, 8, 12, 40])
def test_bf16_y_is_the_float32_y_rounded_once(rows):
    """The kernels write bf16 y for bf16 x: their float32 sums rounded to nearest even once
    (torch's rounding), the same as a float32 y cast afterwards; NaN rows stay NaN."""
    g = torch.Generator().manual_seed(rows)
    n, k = 77, 256
    q = fg.quant.quantize_w4(torch.randn(n, k, generator=g), 64)
    x = torch.randn(rows, k, generator=g).bfloat16()
    x[0, 3] = float("nan")
    operands = (q.packed, q.scales, kernel_zeros(q.scales, q.zeros), n, k, 64, x)
    for kernel in (_core.w4_gemv, _core.w4_gemm):
        y32, y16 = torch.empty(rows, n), torch.full((rows, n), 7.0, dtype=torch.bfloat16)
        wrote = kernel(*operands, y32)
        assert kernel(*operands, y16) == wrote
        if wrote is False:  # the GEMM where this CPU has no AVX-512 BF16: y untouched
            assert (y16 == 7.0).all()
            continue
        assert torch.equal(y16[1:], y32[1:].bfloat16()) and y16[0].isnan().all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows", [_gemm_min_rows(), 40, 130])
def test_wider_x_takes_the_gemm(dtype, rows):
    """float32 / float16 x in the GEMM (two bf16 terms with vdpbf16ps, as it is with FMAs)
    and through w4a16_matmul, an outlier beside small entries."""
    g = torch.Generator().manual_seed(rows)
    n, k = 45, 200
    q = fg.quant.quantize_w4(torch.randn(n, k, generator=g), 32)
    x = torch.randn(rows, k, generator=g).to(dtype)
    x[:, 7] = 30.0  # an outlier: x's split must keep the small entries
    w_hat = q.dequantize().double()
    want = x.double() @ w_hat.T
    size = x.double().abs() @ w_hat.abs().T
    y = torch.empty(rows, n)
    xk = x.float().contiguous()
    if not _core.w4_gemm(q.packed, q.scales.float(), q.zeros, n, k, 32, xk, y):
        pytest.skip("no AVX-512 GEMM on this CPU / SIMD level")
    assert ((y.double() - want).abs() <= 2e-5 * size).all()
    got = fg.w4a16_matmul(x, q).double()
    assert (
        (got - want).abs() <= 2e-5 * size + (1e-3 if dtype == torch.float16 else 0) * want.abs()
    ).all()


def test_bf16_gradient_of_x():
    """dx = dy @ W_hat for bf16 dy: bf16 blocks of W_hat in torch's bf16 matmul."""
    g = torch.Generator().manual_seed(3)
    q = fg.quant.quantize_w4(torch.randn(300, 256, generator=g), 64)
    x = torch.randn(20, 256, generator=g).bfloat16().requires_grad_()
    dy = torch.randn(20, 300, generator=g).bfloat16()
    fg.w4a16_matmul(x, q).backward(dy)
    want = dy.double() @ q.dequantize().double()
    assert x.grad.dtype == torch.bfloat16
    assert (x.grad.double() - want).abs().max() <= 1e-2 * want.abs().max()


@pytest.mark.parametrize("rows", [1, 3, 20])
def test_float16_bias_is_added_before_the_rounding(rows):
    """A product past float16's range whose sum with the bias is finite: the layer must give
    the float64 result rounded once, not inf (the bias added after rounding)."""
    linear = nn.Linear(128, 4)
    with torch.no_grad():
        linear.weight.fill_(1.0)
        linear.bias.copy_(torch.tensor([-2000.0, 0.0, -1.0, 5.0]))
    layer = fg.nn.W4A16Linear.from_linear(linear, 128).half()
    x = torch.full((rows, 128), 520.0, dtype=torch.float16, requires_grad=True)
    got = layer(x)
    w_hat = layer.weight.dequantize().double()
    want = x.double() @ w_hat.T + layer.bias.double()
    assert got.dtype == torch.float16
    assert torch.equal(got, want.half())
    assert got[:, 0].isfinite().all() and got[:, 1:].isinf().all()  # as the exact sums
    got.float().sum().backward()
    assert x.grad.dtype == torch.float16 and x.grad.isfinite().all()


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


def test_w4a16_linear_computes_with_parametrized_bias_and_input_scale():
    # The layer reads its registered tensors from the module's dicts; a parametrized one is a
    # property instead, and must be what the layer computes with.
    from torch.nn.utils import parametrize

    class Halved(nn.Module):
        def forward(self, t):
            return t / 2

    torch.manual_seed(0)
    linear = nn.Linear(128, 40)
    s = torch.rand(128) + 0.5
    layer = fg.nn.W4A16Linear.from_linear(linear, group_size=64, smooth=s)
    q = fg.quant.quantize_w4(linear.weight.detach() * s, 64)
    for name in ("bias", "input_scale"):
        parametrize.register_parametrization(layer, name, Halved())
    x = torch.randn(6, 128)
    want = (x / s / 2) @ q.dequantize().T + linear.bias / 2
    torch.testing.assert_close(layer(x), want, rtol=1e-4, atol=1e-4)


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


def test_smoothquant_plus_losses_are_relative_to_the_output_scale():
    """Activations ~1e20 give outputs whose squares overflow float32: the losses must still be
    the relative errors (equal to those of the same model on activations ~1, for round to
    nearest, which a bias-free ReLU network makes scale-free)."""

    def model():
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Linear(64, 96, bias=False), nn.ReLU(), nn.Linear(96, 32, bias=False)
        )

    batches = outlier_batches()
    unit = fg.quant.smoothquant_plus(model(), batches, group_size=32)
    huge = fg.quant.smoothquant_plus(model(), [b * 1e20 for b in batches], group_size=32)
    losses = list(huge.alpha_losses.values())
    assert all(0 < loss < 1 for loss in losses) and len(set(losses)) > 1
    assert huge.alpha_losses[huge.alpha] == min(losses)
    torch.testing.assert_close(huge.rtn_loss, unit.rtn_loss, rtol=1e-3, atol=0)
    for name, layer in huge.layers.items():
        assert 0 < layer.error < 1 and math.isfinite(layer.error), name


def test_smoothquant_plus_keeps_input_scales_when_folding_is_inexact():
    model = planted_block(PostNorm)
    report = fg.quant.smoothquant_plus(model, outlier_batches(), group_size=64, alpha=0.5)
    assert not report.folded and report.alpha == 0.5
    assert model.q.input_scale is not None
    assert all(layer.folded_into is None for layer in report.layers.values())


def test_smoothquant_plus_swaps_a_shared_linear_everywhere():
    """A Linear used in two places is one W4A16Linear in both (the second stayed float)."""
    torch.manual_seed(0)
    shared = nn.Linear(64, 64)
    model = nn.Sequential(nn.LayerNorm(64), shared, nn.ReLU(), shared)
    batches = [torch.randn(8, 64) for _ in range(2)]
    want = model(batches[0])
    fg.quant.smoothquant_plus(model, batches, group_size=32)
    assert isinstance(model[1], fg.nn.W4A16Linear) and model[3] is model[1]
    got = model(batches[0])
    assert ((got - want).norm() / want.norm()).item() < 0.2
    with pytest.raises(TypeError, match="smoothquant_plus: model must hold its Linears"):
        fg.quant.smoothquant_plus(nn.Linear(8, 8), [torch.randn(2, 8)])


@pytest.mark.parametrize(
    "m, plan",
    [
        (5, ("w4a16_gemm", (2, 1, 4), 1)),  # one m16 tile, part empty
        (20, ("w4a16_gemm_m64", (2, 1, 4), 1)),  # four m16 tiles, two empty
        (70, ("w4a16_gemm_m64", (2, 2, 4), 1)),  # two blocks of rows
    ],
)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group_size, zero_point", [(32, True), (64, False), (-1, True)])
def test_cuda_kernel_decomposition_emulated(m, plan, dtype, group_size, zero_point):
    """kernels/w4a16.cu's blocks, warps, lanes, fragments and split-K, run in torch: equal to
    x @ W_hat.T with W_hat rounded to x's dtype (what the kernel feeds the tensor cores)."""
    g = torch.Generator().manual_seed(1)
    n, k = 136, 128  # two blocks of columns, four K steps (split four ways)
    q = fg.quant.quantize_w4(torch.randn(n, k, generator=g), group_size, zero_point)
    qweight = q.with_layout(GPU_WORDS).packed
    assert qweight.dtype == torch.int32 and qweight.shape == (n, k // 8)
    scales = q.scales.to(dtype)
    zeros = q.zeros if zero_point else torch.full_like(q.scales, 8, dtype=torch.uint8)
    x = torch.randn(m, k, generator=g).to(dtype)
    got = emulate(x, qweight, scales, zeros, group_size)
    per_column = torch.arange(k) // (k if group_size == -1 else group_size)
    w_hat = (q.stored_codes().float() - zeros[:, per_column].float()) * scales[
        :, per_column
    ].float()
    want = x.double() @ w_hat.to(dtype).double().T
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    assert w4_cuda.launch_plan(m, n, k) == plan
    assert w4_cuda.supports(k, group_size) and not w4_cuda.supports(96 + 8, 32)


@pytest.mark.parametrize("lead", [(2, 3), (4, 9)])  # 6 rows: w4a16_gemm, 36: w4a16_gemm_m64
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group_size, zero_point", [(32, False), (-1, True)])
def test_cuda_launch_with_the_emulated_kernel(monkeypatch, lead, dtype, group_size, zero_point):
    """cuda.py's operands and launch arguments, the launch replaced by the emulation."""

    def kernel(file, name, defines):
        def launch(grid, block, args):
            x, qweight, scales, zeros, out, m, n, k, group, per_split = args
            assert (name, grid, per_split) == w4_cuda.launch_plan(m, n, k) and block == (128,)
            assert scales.dtype == x.dtype and zeros.dtype == torch.uint8
            out += emulate(x, qweight, scales, zeros, group)

        assert file == "w4a16.cu" and name in w4_cuda.ENTRY_ROWS
        assert defines == {"W4_T": "__half" if dtype == torch.float16 else "__nv_bfloat16"}
        return launch

    monkeypatch.setattr(w4_cuda.cuda, "is_available", lambda: True)
    monkeypatch.setattr(w4_cuda.cuda, "kernel", kernel)
    monkeypatch.setattr(w4_cuda.cuda, "multiprocessors", lambda device: 132)
    g = torch.Generator().manual_seed(2)
    q = fg.quant.quantize_w4(torch.randn(40, 64, generator=g), group_size, zero_point)
    words = q.with_layout(GPU_WORDS)
    x = torch.randn(*lead, 64, generator=g).to(dtype)
    got = w4_cuda.matmul(x, words.packed, words.scales, words.zeros, 64, group_size, GPU_WORDS)
    want = reference.matmul(x, q.packed, q.scales, q.zeros, 64, group_size, CPU_BLOCKS)
    assert got.shape == (*lead, 40) and got.dtype == dtype
    # Both round float32 sums to x's dtype, summed in different orders: one unit of the largest.
    assert (got.float() - want.float()).abs().max() <= torch.finfo(dtype).eps * want.abs().max()


@pytest.mark.parametrize(
    "scales_dtype, x_dtype",
    [
        (torch.float32, torch.float16),
        (torch.float32, torch.bfloat16),
        (torch.bfloat16, torch.float16),
    ],
)
def test_cuda_takes_the_reference_for_scales_x_cannot_hold(monkeypatch, scales_dtype, x_dtype):
    """float32 scales (and bfloat16 ones with float16 x) would overflow or flush in x's dtype:
    the kernel is not launched, the reference computes in float32."""

    def kernel(*args):
        raise AssertionError("the kernel must not be launched")

    monkeypatch.setattr(w4_cuda.cuda, "is_available", lambda: True)
    monkeypatch.setattr(w4_cuda.cuda, "kernel", kernel)
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(3)) * 1e-6
    q = fg.quant.quantize_w4(w, 32)
    assert q.scales.dtype == torch.float32  # below float16's normal range
    scales = q.scales.to(scales_dtype)
    words = q.with_layout(GPU_WORDS)
    x = torch.randn(3, 64).to(x_dtype)
    got = w4_cuda.matmul(x, words.packed, scales, words.zeros, 64, 32, GPU_WORDS)
    want = reference.matmul(x, q.packed, scales, q.zeros, 64, 32, CPU_BLOCKS)
    assert torch.equal(got, want) and got.isfinite().all()


@pytest.mark.parametrize("m", [1, 7, 16, 33, 128])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("zero_point", [True, False])
@pytest.mark.parametrize("dtype, tol", [(torch.float16, 1e-3), (torch.bfloat16, 8e-3)])
def test_kernel_matches_the_dequantized_weight(device, m, group_size, zero_point, dtype, tol):
    """Marlin's criterion on each device's kernel (kernels/w4a16.cu on a GPU)."""
    g = torch.Generator(device=device).manual_seed(m)
    n, k = 1000, 2048  # N not a multiple of the 128-column block
    w = torch.randn(n, k, device=device, generator=g).to(dtype)
    q = fg.quant.quantize_w4(w, group_size, zero_point)
    assert q.layout == native_layout(device)
    x = torch.randn(m, k, device=device, generator=g).to(dtype)
    got = fg.w4a16_matmul(x, q)
    assert got.dtype == dtype and got.shape == (m, n)
    ref = x.float() @ q.dequantize().float().T
    assert ((got.float() - ref).abs().mean() / ref.abs().mean()).item() < tol


def test_quantizer_is_the_same_on_every_device(device):
    w = torch.randn(40, 200, generator=torch.Generator().manual_seed(4)).half()
    for group_size, zero_point in ((64, True), (-1, False), (48, True)):
        want = fg.quant.quantize_w4(w, group_size, zero_point)
        got = fg.quant.quantize_w4(w.to(device), group_size, zero_point).to("cpu")
        assert torch.equal(got.packed, want.packed) and torch.equal(got.scales, want.scales)
        assert (got.zeros is None) or torch.equal(got.zeros, want.zeros)


class CudaScalarDivision(TorchDispatchMode):
    """torch's CUDA division by a CPU scalar (a Python number, or any 0-dim CPU tensor) as that
    kernel computes it, here on the CPU: a times the reciprocal of b, which can be one ulp off
    the quotient the CPU's division gives."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten.div.Tensor and not kwargs:
            a, b = args
            scalar = isinstance(b, int | float) or (isinstance(b, torch.Tensor) and b.dim() == 0)
            if scalar and a.dtype == torch.float32:
                one = torch.tensor(1.0)
                return a * (one / torch.as_tensor(b, dtype=torch.float32))  # reciprocal in float32
        return func(*args, **kwargs)


@pytest.mark.parametrize("group_size, zero_point", [(64, True), (-1, False), (48, True)])
def test_reference_quantizer_is_exact_under_cudas_scalar_division(group_size, zero_point):
    """The reference quantizer runs for CUDA weights and must give the Rust quantizer's codes and
    scales: under CUDA's division by a scalar (emulated) it still does. The weight holds rows
    whose max / 7 and (max - min) / 15 differ from max * (1 / 7) and range * (1 / 15)."""
    w = torch.randn(40, 200, generator=torch.Generator().manual_seed(4)).half()
    want = ops.cpu.quantize(w, group_size, zero_point)
    with CudaScalarDivision():
        got = reference.quantize(w, group_size, zero_point)
    for name, a, b in zip(("packed", "scales", "zeros"), got, want, strict=True):
        assert torch.equal(a, b), name


def test_gradient_and_bias_on_device(device):
    q = fg.quant.quantize_w4(torch.randn(256, 512, device=device).half(), 128)
    x = torch.randn(4, 512, device=device, dtype=torch.float16, requires_grad=True)
    bias = torch.randn(256, device=device, dtype=torch.float16)
    y = fg.w4a16_matmul(x, q, bias)
    y.float().sum().backward()
    want = torch.ones(4, 256, device=device, dtype=torch.float16) @ q.dequantize()
    torch.testing.assert_close(x.grad, want, rtol=1e-2, atol=1e-2)


def test_w4a16_linear_moves_and_saves_the_cpu_layout(device):
    """On a GPU the module holds its codes in the GPU layout; checkpoints hold the CPU one."""
    torch.manual_seed(0)
    layer = fg.nn.W4A16Linear.from_linear(nn.Linear(96, 24), group_size=32)
    x = torch.randn(3, 96)
    want = layer(x)
    moved = copy.deepcopy(layer).to(device)
    assert moved.layout == moved.weight.layout == native_layout(device)
    torch.testing.assert_close(moved(x.to(device)).cpu(), want, rtol=1e-4, atol=1e-4)
    assert torch.equal(moved.state_dict()["packed"].cpu(), layer.packed)
    fresh = fg.nn.W4A16Linear.from_linear(nn.Linear(96, 24), group_size=32).to(device)
    fresh.load_state_dict(layer.state_dict())
    torch.testing.assert_close(fresh(x.to(device)), moved(x.to(device)))
    assert torch.equal(moved.to("cpu").packed, layer.packed)


def test_w4a16_linear_repacks_into_its_devices_layout(monkeypatch):
    """The repacking on .to() and the state_dict conversion, without a GPU: the CPU is made to
    prefer the GPU layout (the reference kernel runs it)."""
    torch.manual_seed(0)
    layer = fg.nn.W4A16Linear.from_linear(nn.Linear(80, 12), group_size=16)
    x = torch.randn(5, 80)
    want = layer(x)
    state = layer.state_dict()
    monkeypatch.setattr("ferrograd.nn.w4a16.native_layout", lambda device: GPU_WORDS)
    layer.float()
    assert layer.layout == layer.weight.layout == GPU_WORDS
    assert layer.packed.dtype == torch.int32
    torch.testing.assert_close(layer(x), want, rtol=1e-4, atol=1e-4)
    assert torch.equal(layer.state_dict()["packed"], state["packed"])
    layer.load_state_dict(state)
    assert layer.packed.dtype == torch.int32
    torch.testing.assert_close(layer(x), want, rtol=1e-4, atol=1e-4)


# The ops: opcheck (schema, fake kernels, autograd registration, AOT dispatch) and torch.compile.
OPCHECK_CASES = [
    (torch.float32, True, 32, (3, 96)),
    (torch.bfloat16, False, -1, (2, 2, 96)),
    (torch.float16, True, 48, (20, 96)),
]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_op_refuses_x_of_another_k(layout):
    """The op takes K itself: the packed layouts pad K (the CPU's to blocks of 64), so x of 100
    or 127 columns against a 128-column weight matched the weight's tensors and was multiplied
    by its first columns. Every K but the weight's is the ValueError naming x."""
    q = fg.quant.quantize_w4(torch.randn(64, 128), 32).with_layout(layout)
    operands = (q.packed, q.scales, q.zeros)
    x = torch.randn(2, 128)
    y = torch.ops.ferrograd.w4a16_matmul(x, *operands, 128, 32, layout).double()
    want = x.double() @ q.dequantize().double().T
    assert (y - want).abs().max() / want.abs().max() < 1e-4  # x rounded per row (above)
    for k in (64, 96, 100, 127, 130):
        with pytest.raises(ValueError, match=r"w4a16_matmul: x must have shape \[\.\.\., K\]"):
            torch.ops.ferrograd.w4a16_matmul(torch.randn(2, k), *operands, 128, 32, layout)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype, zero_point, group_size, x_shape", OPCHECK_CASES)
def test_opcheck(device, layout, dtype, zero_point, group_size, x_shape):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(20, 96, generator=g).to(device, dtype)
    torch.library.opcheck(ops.w4_quantize_op, (w, group_size, zero_point))
    q = fg.quant.quantize_w4(w, group_size, zero_point).with_layout(layout)
    operands = (q.packed, q.scales, q.zeros)
    torch.library.opcheck(ops.w4_dequantize_op, (*operands, 96, group_size, layout))
    x = torch.randn(x_shape, generator=g).to(device, dtype).requires_grad_()
    torch.library.opcheck(ops.w4a16_matmul_op, (x, *operands, 96, group_size, layout))
    grad = torch.randn(*x_shape[:-1], 20, generator=g).to(device, dtype).requires_grad_()
    torch.library.opcheck(ops.w4a16_matmul_backward_op, (grad, *operands, 96, group_size, layout))


def test_double_backward(device):
    q = fg.quant.quantize_w4(torch.randn(12, 64, device=device), 32)
    x = torch.randn(3, 64, device=device, requires_grad=True)
    (dx,) = torch.autograd.grad(fg.w4a16_matmul(x, q).pow(2).sum(), x, create_graph=True)
    (ddx,) = torch.autograd.grad(dx.sum(), x)
    w_hat = q.dequantize()
    want = 2 * (torch.ones(3, 64, device=device) @ w_hat.T) @ w_hat
    torch.testing.assert_close(ddx, want, rtol=1e-4, atol=1e-4)


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def assert_compiled_matches_eager(fn, x, leaves, backend):
    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    want = fn(x)
    got = compiled(x)
    torch.testing.assert_close(got, want)
    dy = torch.randn_like(want)
    grads = torch.autograd.grad(got, leaves, dy)
    torch.testing.assert_close(grads, torch.autograd.grad(want, leaves, dy))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_matmul_compiles(fresh_dynamo, device, dtype, layout):
    q = fg.quant.quantize_w4(torch.randn(48, 128, device=device), 64).with_layout(layout)
    bias = torch.randn(48, device=device, dtype=dtype, requires_grad=True)
    x = torch.randn(2, 5, 128, device=device, dtype=dtype, requires_grad=True)
    assert_compiled_matches_eager(lambda x: fg.w4a16_matmul(x, q, bias), x, (x, bias), "aot_eager")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_module_compiles_with_inductor(fresh_dynamo, device, dtype):
    torch.manual_seed(0)
    layer = fg.nn.W4A16Linear.from_linear(nn.Linear(128, 40), 32, smooth=torch.rand(128) + 0.5)
    layer = layer.to(device, dtype)
    x = torch.randn(3, 7, 128, device=device, dtype=dtype, requires_grad=True)
    assert_compiled_matches_eager(layer, x, (x, layer.bias), "inductor")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("zero_point", [True, False])
def test_non_finite_weights_are_refused(dtype, bad, zero_point):
    w = torch.randn(5, 300, dtype=dtype)
    w[3, 290] = bad  # the CPU kernel finds it in its range pass, in the last short group
    with pytest.raises(ValueError, match="quantize_w4: weight holds NaN or infinity"):
        fg.quant.quantize_w4(w, 64, zero_point=zero_point)
    if dtype != torch.float64:  # the op itself (float64 runs the reference's torch ops)
        with pytest.raises(ValueError, match=r"quantize_w4: weight holds NaN or infinity \(row 3"):
            ops.w4_quantize_op(w, 64, zero_point)
    # float64 beyond float32's range is finite, so an overflowing range, as in the reference.
    if dtype == torch.float64:
        with pytest.raises(ValueError, match="quantize_w4: weight row 3 has a range"):
            fg.quant.quantize_w4(torch.where(w.isfinite(), w, 1e300), 64)


def test_bad_input():
    with pytest.raises(ValueError, match="quantize_w4: weight must be a non-empty 2-D"):
        fg.quant.quantize_w4(torch.ones(8))
    with pytest.raises(ValueError, match="quantize_w4: group_size must be positive"):
        fg.quant.quantize_w4(torch.ones(2, 8), group_size=0)
    for huge in (2**63, 2**64):
        with pytest.raises(ValueError, match=r"quantize_w4: group_size must be positive \(below"):
            fg.quant.quantize_w4(torch.ones(2, 8), group_size=huge)
    with pytest.raises(TypeError, match="quantize_w4: group_size must be an int"):
        fg.quant.quantize_w4(torch.ones(2, 8), group_size=8.0)
    q = fg.quant.quantize_w4(torch.ones(2, 8), group_size=np.int64(4))  # as torch takes it
    assert q.group_size == 4 and type(q.group_size) is int
    with pytest.raises(TypeError, match="quantize_w4: weight must be a floating"):
        fg.quant.quantize_w4(torch.ones(2, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="quantize_w4: weight is on the meta device"):
        fg.nn.W4A16Linear.from_linear(nn.Linear(64, 8, device="meta"))
    q = fg.quant.quantize_w4(torch.randn(4, 64))
    with pytest.raises(ValueError, match=r"w4a16_matmul: x must have shape \[..., K\] with K = 64"):
        fg.w4a16_matmul(torch.ones(2, 63), q)
    with pytest.raises(TypeError, match="w4a16_matmul: w must be a W4Weight"):
        fg.w4a16_matmul(torch.ones(2, 64), torch.ones(4, 64))
    with pytest.raises(ValueError, match="w4a16_matmul: bias must have shape"):
        fg.w4a16_matmul(torch.ones(2, 64), q, torch.ones(5))
    with pytest.raises(ValueError, match="W4Weight: packed must be torch.int32"):
        dataclasses.replace(q, layout=GPU_WORDS)
    with pytest.raises(ValueError, match="W4Weight: layout must be one of"):
        q.with_layout("rows")
    with pytest.raises(ValueError, match="smoothquant_plus: alpha must be"):
        fg.quant.smoothquant_plus(planted_block(), outlier_batches(), alpha=1.5)
    with pytest.raises(ValueError, match="smoothquant_plus: calibration_batches yielded no"):
        fg.quant.smoothquant_plus(planted_block(), [])


def test_found_by_the_fuzz_campaign():
    """Three cases `make fuzz` found: weights so small that range / 15 underflows float32
    (they keep the smallest positive scale, not 0 -> scale 1 and codes 0); x so small that its
    int16 step would be subnormal (the float kernel takes it: the step kept too few bits); a
    non-contiguous x on the dequantizing path (group sizes not a multiple of 32)."""
    tiny = torch.tensor([[1e-45, -3e-45, 4e-45, 0.0]])
    for zero_point in (True, False):
        q = fg.quant.quantize_w4(tiny, 1 if zero_point else -1, zero_point)
        assert bool((q.scales.float() > 0).all()) and q.scales.dtype == torch.float32
        err = (q.dequantize().double() - tiny.double()).abs()
        assert bool((err <= q.scales.double().amax() / 2).all()), err
    g = torch.Generator().manual_seed(0)
    q = fg.quant.quantize_w4(torch.randn(4, 64, generator=g), 64, True)
    x = torch.full((1, 64), 2e-36) * torch.linspace(-1, 1, 64)
    want = x.double() @ q.dequantize().double().T
    got = fg.w4a16_matmul(x, q).double()
    assert bool(
        ((got - want).abs() <= 1e-6 * (x.double().abs() @ q.dequantize().double().abs().T)).all()
    )
    q7 = fg.quant.quantize_w4(torch.randn(5, 61, generator=g), 7, False)
    xt = torch.randn(2, 61, 3, generator=g).transpose(1, 2)  # [2, 3, 61], not contiguous
    torch.testing.assert_close(
        fg.w4a16_matmul(xt, q7).double(),
        xt.double() @ q7.dequantize().double().T,
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_of_subnormal_size_survive_the_gemm(dtype):
    """Rows of x whose largest entry is below 2^-100 (bf16 3e-39 is subnormal) among normal
    rows, enough rows for the GEMM: AVX512-BF16's `vdpbf16ps` treats subnormal inputs as 0 and
    flushes subnormal sums, so where the GEMM multiplies in bf16 such a call takes the float
    path; the float32 FMA GEMM keeps them. Every row matches float64 (found by `make fuzz`: a
    row of 3e-39 came out 0)."""
    g = torch.Generator().manual_seed(5)
    q = fg.quant.quantize_w4(torch.randn(40, 256, generator=g), 128, True)
    x = torch.randn(_gemm_min_rows() + 3, 256, generator=g)
    x[1] *= 3e-39
    x[4] *= 1e-33
    x = x.to(dtype)
    w_hat = q.dequantize().to(dtype).double()
    want = x.double() @ w_hat.T
    got = fg.w4a16_matmul(x, q).double()
    scale = x.double().abs() @ w_hat.abs().T
    bound = 2e-2 if dtype == torch.bfloat16 else 1e-5  # the output's rounding, the sums'
    assert bool(((got - want).abs() <= bound * scale + 1e-44).all())
    assert bool((got[1] != 0).any()) and bool((got[4] != 0).any())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_zero_group_does_not_swallow_the_row(dtype):
    """A group of zero weights (scale 1 by the rule) beside groups of tiny scales: the GEMV's
    factored sums must not let its two equal terms swallow the row (found by `make fuzz`:
    the row came out exactly 0)."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(6, 4097, generator=g) * 4e-30
    w[:, 4096] = 0.0  # the last group (32 columns, one of them real) is all zero
    q = fg.quant.quantize_w4(w, 32, False)
    assert bool((q.scales[:, -1].float() == 1).all())
    x = (torch.randint(-4, 5, (2, 4097), generator=g) * 1e-3).to(dtype)
    w_hat = q.dequantize().double()
    want = x.double() @ w_hat.T
    size = x.double().abs() @ w_hat.abs().T
    got = fg.w4a16_matmul(x, q).double()
    bound = 2**-8 if dtype == torch.bfloat16 else 1e-6
    assert bool(((got - want).abs() <= bound * want.abs() + 1e-4 * size).all()), (got, want)
