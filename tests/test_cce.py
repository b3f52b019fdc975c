"""fg.linear_cross_entropy on the CPU against float64 logits and torch's F.cross_entropy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ferrograd as fg
from ferrograd.ops import cce

pytestmark = pytest.mark.simd

IGNORE = -100


def reference(e, c, targets, *, bias=None, ignore_index=IGNORE, softcap=None, reduction="mean",
              shift=0, label_smoothing=0.0, z_loss=0.0):  # fmt: skip
    """The definition in float64 with materialized logits."""
    e, c = e.double(), c.double()
    if shift:
        e, targets = e[..., :-shift, :], targets[..., shift:]
    z = e @ c.T
    if bias is not None:
        z = z + bias.double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    flat_z, flat_t = z.reshape(-1, c.shape[0]), targets.reshape(-1)
    row = F.cross_entropy(
        flat_z, flat_t, ignore_index=ignore_index, label_smoothing=label_smoothing,
        reduction="none",
    )  # fmt: skip
    lse = torch.logsumexp(flat_z, -1)
    valid = flat_t != ignore_index
    row = row + z_loss * lse**2 * valid
    if reduction == "none":
        loss = row.view(targets.shape)
    elif reduction == "sum":
        loss = row.sum()
    else:
        loss = row.sum() / valid.sum().clamp(min=1)
    return loss, lse.view(targets.shape)


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 16 vocabulary entries and blocks of 40 rows: every test crosses both."""
    monkeypatch.setattr(cce, "CPU_MIN_CHUNK", 16)
    monkeypatch.setattr(cce, "CPU_BUFFER_ELEMS", 640)


def make_inputs(shape=(3, 50), dim=24, vocab=100, dtype=torch.float32, ignored=0.2, seed=0):
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(*shape, dim, generator=g, dtype=torch.float64)
    c = torch.randn(vocab, dim, generator=g, dtype=torch.float64) / dim**0.5 * 2
    bias = torch.randn(vocab, generator=g, dtype=torch.float64) * 0.5
    targets = torch.randint(0, vocab, shape, generator=g)
    targets[torch.rand(shape, generator=g) < ignored] = IGNORE
    leaves = [t.to(dtype).requires_grad_() for t in (e, c, bias)]
    return (*leaves, targets)


def grads(loss, leaves):
    return torch.autograd.grad(loss, leaves, allow_unused=True)


OPTIONS = [
    {},
    {"bias": True},
    {"softcap": 2.5},
    {"label_smoothing": 0.1},
    {"z_loss": 1e-2},
    {"shift": 1},
    {"shift": 3, "bias": True, "softcap": 4.0, "label_smoothing": 0.2, "z_loss": 1e-3},
    {"ignore_index": 7},
]


def run_both(e, c, bias, targets, options, reduction, ours_dtype=None):
    kw = dict(options)
    use_bias = kw.pop("bias", False)
    b = bias if use_bias else None
    if kw.get("ignore_index") == 7:
        targets = torch.where(targets == IGNORE, 7, targets)
    leaves = [e, c] + ([b] if use_bias else [])
    loss = fg.linear_cross_entropy(e, c, targets, bias=b, reduction=reduction, **kw)
    ref, _ = reference(e, c, targets, bias=b, reduction=reduction, **kw)
    weights = torch.linspace(0.5, 1.5, ref.numel(), dtype=torch.float64).view(ref.shape)
    ours_grads = grads((loss.double() * weights).sum(), leaves)
    # float64 gradients, rounded once to the leaves' dtype at the end
    ref_grads = [g.double() for g in grads((ref * weights).sum(), leaves)]
    return loss, ref, ours_grads, ref_grads


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(o) or "plain")
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-5), (torch.float64, 1e-10)])
def test_matches_float64_reference(small_chunks, options, reduction, dtype, tol):
    e, c, bias, targets = make_inputs(dtype=dtype)
    loss, ref, ours_grads, ref_grads = run_both(e, c, bias, targets, options, reduction)
    assert loss.dtype == dtype
    torch.testing.assert_close(loss.double(), ref, rtol=tol, atol=tol)
    for ours, want in zip(ours_grads, ref_grads, strict=True):
        torch.testing.assert_close(ours.double(), want, rtol=tol, atol=tol * want.abs().max())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("options", [{}, OPTIONS[-1]], ids=["plain", "all"])
def test_half_inputs_are_computed_in_float32(small_chunks, dtype, options):
    """The inputs are exact in their dtype; only the final rounding to it may differ."""
    e, c, bias, targets = make_inputs(dtype=dtype)
    loss, ref, ours_grads, ref_grads = run_both(e, c, bias, targets, options, "mean")
    assert loss.dtype == dtype and all(g.dtype == dtype for g in ours_grads)
    rtol = 2 * torch.finfo(dtype).eps
    torch.testing.assert_close(loss.double(), ref, rtol=rtol, atol=0)
    for ours, want in zip(ours_grads, ref_grads, strict=True):
        torch.testing.assert_close(ours.double(), want, rtol=rtol, atol=1e-4 * want.abs().max())


def test_default_chunking_on_a_larger_vocabulary():
    """No monkeypatching: the real chunk sizes, V not a multiple of any of them."""
    e, c, bias, targets = make_inputs(shape=(130,), dim=32, vocab=70_001)
    loss, ref, ours_grads, ref_grads = run_both(e, c, bias, targets, {"bias": True}, "mean")
    torch.testing.assert_close(loss.double(), ref, rtol=2e-5, atol=2e-5)
    for ours, want in zip(ours_grads, ref_grads, strict=True):
        torch.testing.assert_close(ours.double(), want, rtol=1e-4, atol=1e-5 * want.abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_return_lse_and_its_gradient(small_chunks, dtype):
    e, c, bias, targets = make_inputs(dtype=dtype)
    loss, lse = fg.linear_cross_entropy(e, c, targets, shift=2, softcap=3.0, return_lse=True)
    ref, ref_lse = reference(e, c, targets, shift=2, softcap=3.0)
    assert lse.shape == targets[..., 2:].shape and lse.dtype == dtype
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-6, atol=1e-6)
    ours = grads(loss + 0.3 * lse.sin().sum(), (e, c))
    want = [g.double() for g in grads(ref + 0.3 * ref_lse.sin().sum(), (e, c))]
    for o, w in zip(ours, want, strict=True):
        torch.testing.assert_close(o.double(), w, rtol=1e-5, atol=1e-5 * w.abs().max())


def test_all_ignored_batch_gives_zero_loss_and_gradients(small_chunks):
    e, c, bias, targets = make_inputs(ignored=1.0)
    for reduction in ("mean", "sum"):
        loss = fg.linear_cross_entropy(e, c, targets, bias=bias, reduction=reduction)
        assert loss.item() == 0.0
        for g in grads(loss, (e, c, bias)):
            assert torch.count_nonzero(g) == 0


def test_gradcheck_float64(small_chunks):
    e, c, bias, targets = make_inputs(shape=(2, 9), dim=5, vocab=37, dtype=torch.float64)
    targets[0, 0] = IGNORE

    def f(e, c, bias):
        loss, lse = fg.linear_cross_entropy(
            e, c, targets, bias=bias, softcap=2.0, label_smoothing=0.1, z_loss=0.01, shift=1,
            reduction="none", return_lse=True, filter_eps=None,
        )  # fmt: skip
        return loss, lse

    assert torch.autograd.gradcheck(f, (e, c, bias))


def test_filter_eps(small_chunks):
    """Peaked logits: the never-likely blocks are skipped (their dC rows exactly 0), which
    changes nothing measurable; label smoothing turns the filter off."""
    e, c, bias, targets = make_inputs(shape=(120,), vocab=200, ignored=0.0)
    with torch.no_grad():
        c[:96] *= 0.05  # six chunks of 16 that are never likely
        c[96:] *= 8.0
        targets.copy_(torch.randint(96, 200, targets.shape))
    exact = grads(fg.linear_cross_entropy(e, c, targets, filter_eps=None), (e, c))
    assert torch.count_nonzero(exact[1][:96]) > 0
    for filter_eps in ("auto", 1e-4):
        filtered = grads(fg.linear_cross_entropy(e, c, targets, filter_eps=filter_eps), (e, c))
        for f, x in zip(filtered, exact, strict=True):
            torch.testing.assert_close(f, x, rtol=1e-6, atol=1e-6 * x.abs().max())
    assert torch.count_nonzero(filtered[1][:96]) == 0
    smooth = fg.linear_cross_entropy(e, c, targets, filter_eps=1.0, label_smoothing=0.1)
    assert torch.count_nonzero(grads(smooth, (c,))[0][:96]) > 0


def test_nan_and_infinities_follow_torch(small_chunks):
    """NaN poisons its row only; -inf bias entries (masked vocabulary) and huge logits are fine."""
    e, c, bias, targets = make_inputs(shape=(6,), ignored=0.0)
    targets[:] = torch.tensor([0, 1, 2, 3, 4, 5])
    with torch.no_grad():
        e[1, 3] = float("nan")
        e[2] *= 1e4
        bias[50:] = -float("inf")
    for softcap in (None, 5.0):
        ours = fg.linear_cross_entropy(e, c, targets, bias=bias, softcap=softcap, reduction="none")
        want, _ = reference(e, c, targets, bias=bias, softcap=softcap, reduction="none")
        assert ours[1].isnan() and not ours[[0, 2, 3, 4, 5]].isnan().any()
        torch.testing.assert_close(ours.double(), want, rtol=1e-5, atol=1e-5, equal_nan=True)


def test_module_matches_functional():
    e, c, bias, targets = make_inputs()
    module = fg.nn.LinearCrossEntropy(softcap=3.0, shift=1, z_loss=1e-3)
    assert "softcap=3.0" in repr(module)
    torch.testing.assert_close(
        module(e, c, targets, bias),
        fg.linear_cross_entropy(e, c, targets, bias=bias, softcap=3.0, shift=1, z_loss=1e-3),
    )


def test_inputs_are_left_alone():
    e, c, bias, targets = make_inputs()
    copies = [t.detach().clone() for t in (e, c, bias, targets)]
    fg.linear_cross_entropy(e, c, targets, bias=bias, softcap=2.0, shift=2).backward()
    for t, copy in zip((e, c, bias, targets), copies, strict=True):
        assert torch.equal(t.detach(), copy)


@pytest.mark.parametrize(
    "change, error, match",
    [
        ({"e": [1.0]}, TypeError, "e must be a torch.Tensor"),
        ({"e": torch.ones(4, 24, dtype=torch.int64)}, TypeError, "e must be a floating"),
        ({"c": torch.ones(100, 23)}, ValueError, "c must have shape"),
        ({"c": torch.ones(100, 24, dtype=torch.float64)}, TypeError, "c has dtype"),
        ({"targets": torch.zeros(4)}, TypeError, "targets must be an integer"),
        ({"targets": torch.zeros(5, dtype=torch.int64)}, ValueError, "targets must have shape"),
        ({"targets": torch.full((4,), 100)}, ValueError, r"targets must be in \[0, 100\)"),
        ({"targets": torch.full((4,), -1)}, ValueError, "targets must be in .* got -1"),
        ({"bias": torch.ones(99)}, ValueError, "bias must have shape"),
        ({"reduction": "max"}, ValueError, "reduction must be one of"),
        ({"shift": 5}, ValueError, "shift must be in"),
        ({"shift": 1.0}, TypeError, "shift must be an int"),
        ({"softcap": -1.0}, ValueError, "softcap must be in"),
        ({"softcap": 0.0}, ValueError, "softcap must be a finite positive"),
        ({"label_smoothing": 1.5}, ValueError, "label_smoothing must be in"),
        ({"z_loss": -1.0}, ValueError, "z_loss must be in"),
        ({"filter_eps": "fast"}, ValueError, "filter_eps must be 'auto'"),
        ({"ignore_index": 1.5}, TypeError, "ignore_index must be an int"),
    ],
)
def test_bad_input_names_the_argument(change, error, match):
    args = {"e": torch.ones(4, 24), "c": torch.ones(100, 24), "targets": torch.zeros(4).long()}
    args.update(change)
    e, c, targets = args.pop("e"), args.pop("c"), args.pop("targets")
    with pytest.raises(error, match=f"linear_cross_entropy: {match}"):
        fg.linear_cross_entropy(e, c, targets, **args)
