"""fg.softmax / fg.log_softmax against torch in float64 (the independent reference)."""

from __future__ import annotations

import math

import pytest
import torch

import ferrograd as fg
from ferrograd import _core

pytestmark = pytest.mark.simd

OPS = {"softmax": (fg.softmax, torch.softmax), "log_softmax": (fg.log_softmax, torch.log_softmax)}

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Reduced-precision outputs: within one unit in the last place of the correctly rounded result
# (atol: the smallest subnormal spacing of the dtype).
LOW_PRECISION = {torch.bfloat16: (2.0**-7, 1e-38), torch.float16: (2.0**-10, 2.0**-24)}


def assert_accurate(name: str, got: torch.Tensor, x: torch.Tensor, dim: int):
    """float32 softmax: relative error <= 2e-6 for outputs above 1e-30 (absolute 1e-30 below);
    float32 log_softmax: absolute error <= 1e-5 * max(1, |y|); both against float64 torch."""
    want = OPS[name][1](x.double(), dim)
    if got.dtype in LOW_PRECISION:
        rtol, atol = LOW_PRECISION[got.dtype]
        if name == "log_softmax":  # computed in float32: its 1e-5 absolute bound carries over
            atol = 1e-5
        rounded = want.to(got.dtype).double()
        torch.testing.assert_close(got.double(), rounded, rtol=rtol, atol=atol, equal_nan=True)
        return
    got = got.double()
    if name == "softmax":
        big = want.abs() > 1e-30
        err = (got - want).abs()
        assert (err[big] <= 2e-6 * want.abs()[big]).all(), (
            f"max rel {(err / want.abs())[big].max()}"
        )
        assert (err[~big] <= 1e-30).all()
    else:
        finite = torch.isfinite(want)
        err = (got - want).abs()[finite]
        bound = (1e-5 * want.abs().clamp_min(1.0))[finite]
        assert (err <= bound).all(), f"max error {err.max().item()}"
        assert torch.equal(got[~finite], want[~finite])


SHAPES_DIMS = [
    ((7,), 0),
    ((1, 1), -1),
    ((5, 33), -1),
    ((3, 1000), 1),
    ((4, 37, 21), 1),  # strided kernel (inner 21)
    ((4, 37, 3), 1),  # inner < 16: moved last
    ((6, 5, 40), 0),
    ((2, 3, 4, 64), 2),
    ((300, 17), 0),
]


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize(("shape", "dim"), SHAPES_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_matches_float64(name, shape, dim, dtype):
    gen = torch.Generator().manual_seed(hash((shape, dim)) % 2**31)
    x = (torch.randn(shape, generator=gen) * 8).to(dtype)
    y = OPS[name][0](x, dim)
    assert y.dtype == dtype and y.shape == x.shape
    assert_accurate(name, y, x, dim)


# Small and short rows, the in-cache kernels' limits either side (AVX-512: softmax's forward
# and 16-bit rows 131072, float32 log_softmax's forward and backwards 4096; AVX2 and scalar:
# 262143 for all), a row long enough to be split across threads, strided slabs (with a scalar
# tail).
KERNEL_CASES = [
    ((7,), 0),
    ((5, 33), -1),
    ((3, 1000), 1),
    ((2, 4096), 1),
    ((2, 4097), 1),
    ((1, 131072), -1),
    ((1, 131073), -1),
    ((1, 262143), -1),
    ((2, 262144), 1),
    ((1, 300001), -1),
    ((4, 37, 21), 1),
    ((300, 17), 0),
]


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize(("shape", "dim"), KERNEL_CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kernels_read_and_write_each_dtype(shape, dim, dtype, log):
    """The Rust kernels called directly (fg.softmax hands small inputs to torch where torch is
    as accurate): x, y and the gradients in the tensor's own dtype, against float64."""
    name = "log_softmax" if log else "softmax"
    dim %= len(shape)
    gen = torch.Generator().manual_seed(hash((shape, dim, log)) % 2**31)
    x = (torch.randn(shape, generator=gen) * 8).to(dtype)
    g = torch.randn(shape, generator=gen).to(dtype)
    dims = (math.prod(shape[:dim]), shape[dim], math.prod(shape[dim + 1 :]))
    y = torch.empty_like(x)
    _core.softmax_forward(x, y, *dims, log)
    assert_accurate(name, y, x, dim)
    dx = torch.empty_like(x)
    _core.softmax_backward(y, g, dx, *dims, log)
    yd, gd = y.double(), g.double()
    if log:
        want = gd - yd.exp() * gd.sum(dim, keepdim=True)
    else:
        want = yd * (gd - (yd * gd).sum(dim, keepdim=True))
    # One rounding to the dtype on top of float32 arithmetic.
    rtol = LOW_PRECISION[dtype][0] if dtype in LOW_PRECISION else 1e-5
    atol = rtol * want.abs().max().item() * 1e-2 + 1e-6
    torch.testing.assert_close(dx.double(), want, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", DTYPES[1:], ids=str)
@pytest.mark.parametrize("layout", ["row", "column"])
def test_special_values_in_16_bit_kernels(dtype, layout):
    inf, nan = float("inf"), float("nan")
    rows = torch.tensor(
        [
            [-inf, 0.0, 1.0, -inf],
            [-inf, -inf, -inf, -inf],
            [inf, 0.0, 1.0, 2.0],
            [nan, 0.0, 1.0, 2.0],
            [0.5, 0.25, 0.0, -0.25],
        ]
    ).to(dtype)
    x = rows if layout == "row" else rows.t().repeat(1, 4).contiguous()
    dims = (5, 4, 1) if layout == "row" else (1, 4, 20)
    dim = 1 if layout == "row" else 0
    for log in (False, True):
        y = torch.empty_like(x)
        _core.softmax_forward(x, y, *dims, log)
        ref = torch.log_softmax if log else torch.softmax
        want = ref(x.double(), dim).to(dtype)
        assert torch.equal(torch.isnan(y), torch.isnan(want))
        ok = ~torch.isnan(want)
        torch.testing.assert_close(y[ok], want[ok], rtol=LOW_PRECISION[dtype][0], atol=1e-5)


def test_kernels_refuse_mixed_dtypes():
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="softmax: out must be a torch.bfloat16 tensor"):
        _core.softmax_forward(x, torch.empty(4, 8), 4, 8, 1)
    with pytest.raises(TypeError, match="softmax: out must be a torch.float32 tensor"):
        _core.softmax_forward(x.float(), torch.empty_like(x), 4, 8, 1)


@pytest.mark.parametrize("name", OPS)
def test_wide_value_ranges(name):
    gen = torch.Generator().manual_seed(1)
    for spread in (1e-3, 1.0, 30.0, 1e3, 1e5):
        x = torch.randn(8, 513, generator=gen) * spread
        assert_accurate(name, OPS[name][0](x, -1), x, -1)


@pytest.mark.parametrize("name", OPS)
def test_non_contiguous_inputs(name):
    base = torch.randn(40, 64, 3)
    for x in (base.transpose(0, 1), base[:, ::2, 1], base.permute(2, 0, 1)[:, 5:, :]):
        assert not x.is_contiguous()
        for dim in range(x.dim()):
            assert_accurate(name, OPS[name][0](x, dim), x, dim)


@pytest.mark.parametrize("name", OPS)
def test_input_is_left_untouched(name):
    x = torch.randn(16, 100)
    before = x.clone()
    OPS[name][0](x)
    assert torch.equal(x, before)


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 5), (2, 0, 4)])
def test_empty_tensors(name, shape):
    x = torch.randn(shape)
    for dim in range(len(shape)):
        y = OPS[name][0](x, dim)
        assert y.shape == x.shape and y.numel() == 0


@pytest.mark.parametrize("name", OPS)
def test_zero_dim_tensor(name):
    x = torch.tensor(3.5)
    for dim in (0, -1):
        y = OPS[name][0](x, dim)
        assert y.shape == ()
        assert_accurate(name, y, x, dim)


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("layout", ["row", "column"])
def test_special_values_follow_torch(name, layout):
    inf, nan = float("inf"), float("nan")
    rows = torch.tensor(
        [
            [-inf, 0.0, 1.0, -inf],
            [-inf, -inf, -inf, -inf],
            [inf, 0.0, 1.0, 2.0],
            [nan, 0.0, 1.0, 2.0],
            [1e38, -1e38, 0.0, 3.0],
            [-1e38, -1e38, -3e38, -2e38],
            [3e6, 3e6 + 1, -5e6, 0.0],
            [0.5, 0.25, 0.0, -0.25],
        ]
    )
    # The column layout runs the strided kernel: 16+ softmaxes side by side.
    x = rows if layout == "row" else rows.t().repeat(1, 3)
    dim = 1 if layout == "row" else 0
    got = OPS[name][0](x, dim)
    want = OPS[name][1](x.double(), dim).float()
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    ok = ~torch.isnan(want)
    torch.testing.assert_close(got[ok], want[ok], rtol=2e-6, atol=1e-30)


@pytest.mark.parametrize("n", [4096, 4097, 131072, 131073])
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_special_values_in_long_rows(n, log):
    """Rows either side of the in-cache kernels' limits (float32 softmax forward 131072,
    log_softmax 4096) with -inf, +inf, NaN and huge entries among ordinary ones follow torch."""
    inf, nan = float("inf"), float("nan")
    specials = [[-inf, 0.0, -inf], [inf, 1.0, 2.0], [nan, 0.0, 1.0], [1e38, -1e38, 3.0]]
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(len(specials) + 1, n, generator=gen) * 3
    for r, values in enumerate(specials):
        x[r, torch.randperm(n, generator=gen)[: len(values)]] = torch.tensor(values)
    x[-1] = -inf  # every entry -inf: NaN, as torch gives
    y = torch.empty_like(x)
    _core.softmax_forward(x, y, x.shape[0], n, 1, log)
    want = (torch.log_softmax if log else torch.softmax)(x.double(), 1).float()
    assert torch.equal(torch.isnan(y), torch.isnan(want))
    ok = ~torch.isnan(want)
    torch.testing.assert_close(y[ok], want[ok], rtol=2e-6 if not log else 1e-5, atol=1e-30)


@pytest.mark.parametrize("name", OPS)
def test_long_row_split_across_threads(name):
    fg.set_num_threads(4)  # conftest restores the default
    x = torch.randn(2, 300_001) * 5
    assert_accurate(name, OPS[name][0](x, -1), x, -1)
    x = torch.randn(1, 300_001) * 5
    assert_accurate(name, OPS[name][0](x, -1), x, -1)


@pytest.mark.slow
def test_row_of_1e8_elements():
    fg.set_num_threads(max(2, torch.get_num_threads()))
    x = torch.randn(10**8)
    x[12345] = 40.0  # one dominant entry far from the split points
    y = fg.softmax(x)
    want = torch.softmax(x.double(), 0)
    big = want > 1e-30
    rel = ((y.double() - want).abs() / want)[big]
    assert rel.max().item() <= 2e-6


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize(("shape", "dim"), [((5, 33), -1), ((4, 37, 21), 1), ((4, 9, 5), 1)])
def test_gradients_match_torch_float64(name, shape, dim):
    x = torch.randn(shape) * 3
    g = torch.randn(shape)
    xf = x.clone().requires_grad_()
    OPS[name][0](xf, dim).backward(g)
    xd = x.double().requires_grad_()
    OPS[name][1](xd, dim).backward(g.double())
    torch.testing.assert_close(xf.grad.double(), xd.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_second_derivatives_match_torch_float64(name, dtype):
    """Hessian-vector products through the Rust kernels' forward (create_graph=True): the
    backward then runs in torch's differentiable ops."""
    x, w, v = torch.randn(64, 4096) * 3, torch.randn(64, 4096), torch.randn(64, 4096)

    def hvp(f, x):
        x = x.clone().requires_grad_()
        (g,) = torch.autograd.grad((f(x, -1) * w.to(x.dtype)).sum(), x, create_graph=True)
        return torch.autograd.grad((g * v.to(x.dtype)).sum(), x)[0]

    got = hvp(OPS[name][0], x.to(dtype)).double()
    want = hvp(OPS[name][1], x.to(dtype).double())
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item())


@pytest.mark.parametrize("name", OPS)
def test_gradgradcheck_float64(name):
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda x: OPS[name][0](x, -1), (x,))


@pytest.mark.parametrize("name", OPS)
def test_gradients_in_bfloat16(name):
    x = torch.randn(6, 50)
    g = torch.randn(6, 50)
    xb = x.bfloat16().requires_grad_()
    OPS[name][0](xb, -1).backward(g.bfloat16())
    assert xb.grad.dtype == torch.bfloat16
    xd = x.bfloat16().double().requires_grad_()
    OPS[name][1](xd, -1).backward(g.bfloat16().double())
    torch.testing.assert_close(xb.grad.double(), xd.grad, rtol=2e-2, atol=2e-2)


def test_long_row_gradients():
    fg.set_num_threads(4)
    x = torch.randn(1, 200_000)
    g = torch.randn(1, 200_000)
    for name in OPS:
        xf = x.clone().requires_grad_()
        OPS[name][0](xf).backward(g)
        xd = x.double().requires_grad_()
        OPS[name][1](xd, -1).backward(g.double())
        torch.testing.assert_close(xf.grad.double(), xd.grad, rtol=1e-4, atol=1e-7)


def test_float64_and_other_devices_fall_back_to_torch():
    x = torch.randn(4, 9, dtype=torch.float64)
    assert torch.equal(fg.softmax(x), torch.softmax(x, -1))
    m = torch.empty(4, 9, device="meta")
    assert fg.log_softmax(m).device.type == "meta"


@pytest.mark.parametrize("name", OPS)
def test_bad_inputs_raise_clear_errors(name):
    fn = OPS[name][0]
    for bad in (
        torch.arange(6),
        torch.ones(3, dtype=torch.bool),
        torch.ones(2, dtype=torch.cfloat),
    ):
        with pytest.raises(TypeError, match=rf"{name}: x"):
            fn(bad)
    with pytest.raises(TypeError, match=rf"{name}: x"):
        fn([1.0, 2.0])
    with pytest.raises(IndexError, match=rf"{name}: dim"):
        fn(torch.randn(2, 3), 2)
    with pytest.raises(ValueError, match=rf"{name}: dim"):
        fn(torch.randn(2, 3), -3)
    with pytest.raises(TypeError, match=rf"{name}: dim"):
        fn(torch.randn(2, 3), 1.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_devices_agree_with_torch(device, dtype):
    """CPU: the Rust kernels; any other device: torch's softmax through the same op."""
    x = torch.randn(64, 1000, device=device, dtype=dtype, requires_grad=True)
    y = fg.softmax(x, -1)
    assert y.device == x.device and y.dtype == dtype
    torch.testing.assert_close(y, torch.softmax(x, -1))
    y.sum().backward()
    assert x.grad is not None and x.grad.device == x.device
    torch.testing.assert_close(fg.log_softmax(x, 0), torch.log_softmax(x, 0))


@pytest.mark.parametrize("name", OPS)
def test_dtype_argument_casts_first_as_torch(name):
    fn, ref = OPS[name]
    x = torch.randn(3, 70, dtype=torch.bfloat16)
    got = fn(x, dim=-1, dtype=torch.float32)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref(x, -1, dtype=torch.float32))
    assert fn(torch.arange(6.0).reshape(2, 3), 1, torch.float64).dtype == torch.float64
    with pytest.raises(TypeError, match=rf"{name}: dtype"):
        fn(x, -1, "float32")


@pytest.mark.parametrize("name", OPS)
def test_empty_input_keeps_its_graph(name):
    x = torch.randn(5, 0, 0, requires_grad=True)
    (grad,) = torch.autograd.grad(OPS[name][0](x, -1).sum(), x)
    assert grad.shape == x.shape


@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize(
    ("shape", "dim", "dtype"),
    [((5, 33), 1, torch.float32), ((4, 7, 3), 1, torch.bfloat16), ((6, 9), 0, torch.float64)],
)
def test_opcheck(shape, dim, dtype, log):
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    torch.library.opcheck(torch.ops.ferrograd.softmax.default, (x, dim, log))
    y = torch.softmax(x.detach(), dim)
    g = torch.randn(shape, dtype=dtype)
    torch.library.opcheck(torch.ops.ferrograd.softmax_backward.default, (y, g, dim, log))


def test_small_inputs_with_gradients_take_torchs_op_where_as_accurate():
    """Which op a call records: torch's own for inputs where it is as accurate and small enough
    to be faster (a higher limit when the call records a graph: the backward's Python node
    costs more than torch's), ferrograd's elsewhere; the gradients match float64 either way."""
    from ferrograd.ops.softmax import cpu

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the limits scale with threads up to 2
    try:
        n = cpu.TORCH_BELOW_GRAD // 512
        for rows, dtype, log, ours in [
            (n // 2, torch.bfloat16, False, False),  # between the two limits, grad: torch
            (n, torch.bfloat16, False, True),
            (n // 2, torch.float32, True, False),
            (n // 2, torch.float32, False, True),  # float32 softmax: always ferrograd's
            (n // 2, torch.bfloat16, True, True),  # 16-bit log_softmax: always ferrograd's
        ]:
            x = torch.randn(rows, 512).to(dtype).requires_grad_()
            y = (fg.log_softmax if log else fg.softmax)(x)
            assert ("ferrograd" in type(y.grad_fn).__name__) is ours, (rows, dtype, log)
            g = torch.randn_like(y)
            (dx,) = torch.autograd.grad(y, x, g)
            x64 = x.detach().double().requires_grad_()
            y64 = (torch.log_softmax if log else torch.softmax)(x64, -1)
            (want,) = torch.autograd.grad(y64, x64, g.double())
            tol = 1e-5 if dtype is torch.float32 else 3e-2
            assert torch.allclose(dx.double(), want, rtol=tol, atol=tol)
            with torch.no_grad():  # no graph: the lower limit
                y = (fg.log_softmax if log else fg.softmax)(x)
                assert y.grad_fn is None
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ops_take_negative_dims_as_torch(dtype, log):
    """The torch.library ops themselves (not only the public functions) take a dim in
    [-rank, rank), as torch's softmax does, and name the op and dim outside it."""
    torch.manual_seed(7)
    x = torch.randn(4, 40, 512).to(dtype)  # large enough for the Rust kernels
    ref_fn = torch.log_softmax if log else torch.softmax
    bwd = torch._log_softmax_backward_data if log else torch._softmax_backward_data
    tol = 1e-5 if dtype is torch.float32 else 2e-2
    for dim in (-1, -2, -3):
        y = torch.ops.ferrograd.softmax(x, dim, log)
        want = ref_fn(x.double(), dim)
        assert torch.allclose(y.double(), want, rtol=tol, atol=tol), dim
        g = torch.randn_like(x)
        dx = torch.ops.ferrograd.softmax_backward(y, g, dim, log)
        want_dx = bwd(g.double(), y.double(), dim, torch.float64)
        assert torch.allclose(dx.double(), want_dx, rtol=tol, atol=tol), dim
    for dim in (3, -4):
        with pytest.raises(IndexError, match="softmax: dim"):
            torch.ops.ferrograd.softmax(x, dim, log)
    scalar = torch.tensor(0.5, dtype=dtype)
    assert torch.ops.ferrograd.softmax(scalar, -1, log).shape == ()


@pytest.mark.parametrize("name", OPS)
def test_compiled_equals_eager(name):
    fn = OPS[name][0]

    def attention(q, k):
        return fn(q @ k.transpose(-1, -2) / 8.0, dim=-1, dtype=torch.float32)

    torch._dynamo.reset()
    compiled = torch.compile(attention, fullgraph=True)
    q = torch.randn(2, 4, 16, 8, requires_grad=True)
    k = torch.randn(2, 4, 16, 8, requires_grad=True)
    want = attention(q, k)
    got = compiled(q, k)
    torch.testing.assert_close(got, want)
    g = torch.randn_like(want)
    torch.testing.assert_close(
        torch.autograd.grad(got, (q, k), g), torch.autograd.grad(want, (q, k), g)
    )


def test_dim_takes_any_integer_type_as_torch():
    import numpy as np

    x = torch.randn(3, 5)
    torch.testing.assert_close(fg.softmax(x, np.int64(0)), torch.softmax(x, np.int64(0)))
    with pytest.raises(TypeError, match="softmax: dim must be an int, got bool"):
        fg.softmax(x, True)


@pytest.mark.parametrize("shape_dim", [((65535, 1), 0), ((4000, 8), 0), ((2, 8000, 3), 1)])
def test_small_inputs_over_other_dims_keep_the_bound(shape_dim):
    """torch's log_softmax over a dim other than the last sums in one running float32 sum
    (a column of 65535 values came out 1.2e-4 off): such calls stay on the kernels."""
    shape, dim = shape_dim
    torch.manual_seed(0)
    x = torch.randn(shape) * 1e-3
    for name in ("log_softmax", "softmax"):
        assert_accurate(name, getattr(fg, name)(x, dim), x, dim)


@pytest.mark.parametrize("shape_dim", [((65535,), 0), ((3, 40000), 1), ((40000, 32), 0)])
def test_long_constant_rows_keep_the_documented_bound(shape_dim):
    """Equal terms round the same way at every add: the f32 partial sums must stay short."""
    shape, dim = shape_dim
    x = torch.full(shape, 5.0)
    assert_accurate("softmax", fg.softmax(x, dim), x, dim)
