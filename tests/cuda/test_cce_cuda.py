"""kernels/cce.cu through cce_forward_cuda / cce_backward_cuda against float64 torch, by
ml-cross-entropy's criterion: elementwise |ref64 - ours| <= |ref64 - torch in dtype| + tol (and
no worse in norm) for 16-bit inputs; close to float64 for float32 (both near it)."""

from __future__ import annotations

import pytest
import torch

from ferrograd import cuda as fgcuda
from ferrograd.ops.cce_cuda import cce_backward_cuda, cce_forward_cuda

pytestmark = pytest.mark.skipif(not fgcuda.is_available(), reason="needs a CUDA GPU")

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def problem(n, v, d, dtype, *, bias=True, seed=0, ignore_every=5, smoothing=0.0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    e = torch.randn(n, d, device="cuda", generator=g).to(dtype)
    c = (torch.randn(v, d, device="cuda", generator=g) / d**0.25).to(dtype)
    b = (torch.randn(v, device="cuda", generator=g) * 0.5).to(dtype) if bias else None
    targets = torch.randint(0, v, (n,), device="cuda", generator=g)
    targets[::ignore_every] = -100
    valid = (targets >= 0).float()
    weight = valid * (1 + torch.rand(n, device="cuda", generator=g)) / valid.sum().clamp_min(1)
    coefs = (weight, weight * (1 - smoothing), weight * smoothing / v)
    return e, c, b, targets, coefs


def logits(e, c, b, softcap, dtype):
    z = e.to(dtype) @ c.to(dtype).T
    if b is not None:
        z = z + b.to(dtype)
    return z if softcap is None else softcap * torch.tanh(z / softcap)


def reference_forward(e, c, b, targets, softcap, dtype):
    z = logits(e, c, b, softcap, dtype).double()
    picked = z.gather(1, targets.clamp_min(0)[:, None])[:, 0]
    return z.logsumexp(1), torch.where(targets >= 0, picked, 0.0), z.sum(1)


def reference_backward(e, c, b, targets, lse, coefs, softcap, dtype):
    """(dE, dC, dbias) with the logits, dz and both GEMMs in ``dtype`` (float64: the truth)."""
    z = logits(e, c, b, softcap, dtype)
    cs, ct, cu = (t.to(torch.float64 if dtype == torch.float64 else torch.float32) for t in coefs)
    p = torch.exp(z.to(cs.dtype) - lse.to(cs.dtype)[:, None])
    dz = cs[:, None] * p - cu[:, None]
    rows = torch.nonzero(targets >= 0)[:, 0]
    dz[rows, targets[rows]] -= ct[rows]
    if softcap is not None:
        dz = dz * (1 - (z.to(cs.dtype) / softcap) ** 2)
    dz = dz.to(dtype)
    return dz @ c.to(dtype), dz.T @ e.to(dtype), dz.sum(0)


def assert_as_good_as_torch(ours, ref, base, dtype, what):
    ours, ref, base = ours.double(), ref.double(), base.double()
    scale = ref.abs().max().item()
    if dtype == torch.float32:
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5 * scale, msg=what)
        return
    err, base_err = (ref - ours).abs(), (ref - base).abs()
    worst = (err - base_err).max().item()
    assert worst <= 1e-3 * scale, f"{what}: worse than torch in {dtype} by {worst} (of {scale})"
    assert err.norm() <= base_err.norm() + 1e-6 * scale, f"{what}: worse than torch in norm"


def check(n, v, d, dtype, *, softcap=None, bias=True, smoothing=0.0, filter_eps=None, seed=0):
    e, c, b, targets, coefs = problem(n, v, d, dtype, bias=bias, seed=seed, smoothing=smoothing)
    lse, z_target, z_sum = cce_forward_cuda(e, c, b, targets, softcap, True)
    assert lse.dtype == z_target.dtype == z_sum.dtype == torch.float32
    ref = reference_forward(e, c, b, targets, softcap, torch.float64)
    base = reference_forward(e, c, b, targets, softcap, dtype)
    for name, o, r, s in zip(
        ("lse", "z_target", "z_sum"), (lse, z_target, z_sum), ref, base, strict=True
    ):
        assert_as_good_as_torch(o, r, s, dtype, f"{name} {dtype}")

    de, dc, db = cce_backward_cuda(
        e, c, b, targets, lse, *coefs, softcap, filter_eps, need_bias_grad=True
    )
    assert (de.dtype, dc.dtype, db.dtype) == (dtype, dtype, dtype)
    e64, c64 = e.double(), c.double()
    b64 = None if b is None else b.double()
    ref = reference_backward(e64, c64, b64, targets, ref[0], coefs, softcap, torch.float64)
    base = reference_backward(e, c, b, targets, lse, coefs, softcap, dtype)
    for name, o, r, s in zip(("dE", "dC", "dbias"), (de, dc, db), ref, base, strict=True):
        assert_as_good_as_torch(o, r, s, dtype, f"{name} {dtype}")
    return de, dc, db


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "options",
    [{}, {"softcap": 15.0}, {"bias": False}, {"smoothing": 0.1}, {"filter_eps": 0.0}],
    ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "plain",
)
def test_matches_float64_as_well_as_torch_does(dtype, options):
    check(777, 3001, 200, dtype, **options)  # no size a multiple of a tile or a 64-byte slice


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, v, d", [(1, 1, 8), (3, 130, 8), (64, 128, 64), (65, 257, 1032)])
def test_edge_shapes(dtype, n, v, d):
    check(n, v, d, dtype, softcap=30.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_filter_skips_negligible_blocks_without_changing_the_result(dtype):
    """Half the vocabulary sits 40 nats below the rest (no target there): ordered by mean logit
    it fills whole blocks that the filter drops (their dbias stays exactly 0), and every
    gradient still matches float64 as well as torch does."""
    n, v, d = 300, 2048, 64
    e, c, b, targets, coefs = problem(n, v, d, dtype, ignore_every=7)
    low = torch.randperm(v, device="cuda")[: v // 2]
    b = b.float()
    b[low] -= 40.0
    b = b.to(dtype)
    is_low = torch.zeros(v, dtype=torch.bool, device="cuda")
    is_low[low] = True
    keep = targets < 0
    targets = torch.where(is_low[targets.clamp_min(0)] & ~keep, (~is_low).nonzero()[0, 0], targets)
    lse, _, _ = cce_forward_cuda(e, c, b, targets, None, False)
    # |coef| p is ~1e-19 in the low half and above ~1e-9 elsewhere.
    filtered = cce_backward_cuda(e, c, b, targets, lse, *coefs, None, 1e-12, True)
    assert (filtered[2][low] == 0).all()
    if dtype != torch.float16:  # unfiltered, those dbias entries are tiny but not 0
        full = cce_backward_cuda(e, c, b, targets, lse, *coefs, None, None, True)
        assert (full[2][low] != 0).any()
    e64, c64, b64 = e.double(), c.double(), b.double()
    lse64 = reference_forward(e64, c64, b64, targets, None, torch.float64)[0]
    ref = reference_backward(e64, c64, b64, targets, lse64, coefs, None, torch.float64)
    base = reference_backward(e, c, b, targets, lse, coefs, None, dtype)
    for name, o, r, s in zip(("dE", "dC", "dbias"), filtered, ref, base, strict=True):
        assert_as_good_as_torch(o, r, s, dtype, f"filtered {name} {dtype}")


def test_clear_errors():
    e, c, b, targets, _ = problem(4, 16, 8, torch.float16)
    with pytest.raises(ValueError, match="cce_forward_cuda: D = 12 must be a multiple of 8"):
        cce_forward_cuda(e[:, :6].repeat(1, 2), c[:, :6].repeat(1, 2), b, targets, None, False)
    with pytest.raises(TypeError, match="cce_forward_cuda: c must have e's dtype"):
        cce_forward_cuda(e, c.float(), b, targets, None, False)
    with pytest.raises(ValueError, match="cce_forward_cuda: softcap"):
        cce_forward_cuda(e, c, b, targets, -1.0, False)
    lse = torch.zeros(4, device="cuda")
    with pytest.raises(ValueError, match="cce_backward_cuda: coef_target must be a float32"):
        cce_backward_cuda(e, c, b, targets, lse, lse, lse.double(), lse, None, None, False)
