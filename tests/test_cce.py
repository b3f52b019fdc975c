"""fg.linear_cross_entropy against float64 logits and torch's F.cross_entropy, on the CPU and (where
present) a GPU; kernels/cce.cu's launches directly on a GPU; the two ops under opcheck and
torch.compile."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ferrograd as fg
from ferrograd import cuda as fgcuda
from ferrograd.ops import cce
from ferrograd.ops.cce.cuda import cce_backward_cuda, cce_forward_cuda

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
    """Chunks of 16 vocabulary entries and blocks of 40 rows (also the fused pass's, where
    V >= 16): every test crosses both. Small eager calls run the op too (not small.py)."""
    monkeypatch.setattr(cce.small, "LOGITS_BELOW", 0)
    monkeypatch.setattr(cce.reference, "CPU_MIN_CHUNK", 16)
    monkeypatch.setattr(cce.reference, "CPU_BUFFER_ELEMS", 640)
    monkeypatch.setattr(cce.reference, "FUSED_MIN_ROWS", 40)
    monkeypatch.setattr(cce.reference, "FUSED_BUFFER_ELEMS", 640)


def make_inputs(
    shape=(3, 50), dim=24, vocab=100, dtype=torch.float32, ignored=0.2, seed=0, device="cpu"
):
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(*shape, dim, generator=g, dtype=torch.float64)
    c = torch.randn(vocab, dim, generator=g, dtype=torch.float64) / dim**0.5 * 2
    bias = torch.randn(vocab, generator=g, dtype=torch.float64) * 0.5
    targets = torch.randint(0, vocab, shape, generator=g)
    targets[torch.rand(shape, generator=g) < ignored] = IGNORE
    leaves = [t.to(device, dtype).requires_grad_() for t in (e, c, bias)]
    return (*leaves, targets.to(device))


def kernel_tol(device, dtype, tol):
    """kernels/cce.cu adds float32 in its tiles' order, further from float64 than the CPU's."""
    return max(tol, 1e-4) if device == "cuda" and dtype == torch.float32 else tol


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
    weights = torch.linspace(0.5, 1.5, ref.numel(), dtype=torch.float64, device=ref.device)
    weights = weights.view(ref.shape)
    ours_grads = grads((loss.double() * weights).sum(), leaves)
    # float64 gradients, rounded once to the leaves' dtype at the end
    ref_grads = [g.double() for g in grads((ref * weights).sum(), leaves)]
    return loss, ref, ours_grads, ref_grads


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(o) or "plain")
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-5), (torch.float64, 1e-10)])
def test_matches_float64_reference(small_chunks, device, options, reduction, dtype, tol):
    tol = kernel_tol(device, dtype, tol)
    e, c, bias, targets = make_inputs(dtype=dtype, device=device)
    loss, ref, ours_grads, ref_grads = run_both(e, c, bias, targets, options, reduction)
    assert loss.dtype == dtype
    torch.testing.assert_close(loss.double(), ref, rtol=tol, atol=tol)
    for ours, want in zip(ours_grads, ref_grads, strict=True):
        torch.testing.assert_close(ours.double(), want, rtol=tol, atol=tol * want.abs().max())


@pytest.mark.parametrize("options", [{}, {"softcap": 60.0}, {"label_smoothing": 0.1}],
                         ids=["plain", "softcap", "smoothing"])  # fmt: skip
def test_widely_spread_logits_match_float64(small_chunks, options):
    """Logits spread over hundreds: most probabilities lie below float32's normal range, which
    the kernel writes into the gradient as 0 (subnormal operands slow the GEMMs down by orders of
    magnitude); the loss and gradients stay float64's."""
    e, c, bias, targets = make_inputs()
    with torch.no_grad():
        e.mul_(40)  # logits with a standard deviation of about 80
    loss, ref, ours_grads, ref_grads = run_both(e, c, bias, targets, options, "mean")
    torch.testing.assert_close(loss.double(), ref, rtol=2e-5, atol=2e-5)
    for ours, want in zip(ours_grads, ref_grads, strict=True):
        torch.testing.assert_close(ours.double(), want, rtol=2e-5, atol=2e-5 * want.abs().max())


def float32_products(dtype: torch.dtype) -> bool:
    """Whether the CPU kernel upcasts the chunk matmuls of ``dtype`` inputs to float32."""
    return cce.cpu.gemm_dtype(dtype) == torch.float32


HALF_OPTIONS = [{}, OPTIONS[-2]]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("options", HALF_OPTIONS, ids=["plain", "all"])
def test_half_inputs_with_float32_products(small_chunks, dtype, options):
    """The inputs are exact in their dtype; only the final rounding to it may differ, but for a
    bfloat16 dC: it accumulates in bfloat16, rounded once per row block (4 blocks of 40 rows
    here), each rounding within 2^-8 of a partial sum (taken as at most twice the largest
    entry)."""
    if not float32_products(dtype):
        pytest.skip(f"this CPU multiplies {dtype} natively (next test)")
    e, c, bias, targets = make_inputs(dtype=dtype)
    loss, ref, ours_grads, ref_grads = run_both(e, c, bias, targets, options, "mean")
    assert loss.dtype == dtype and all(g.dtype == dtype for g in ours_grads)
    rtol = 2 * torch.finfo(dtype).eps
    torch.testing.assert_close(loss.double(), ref, rtol=rtol, atol=0)
    for i, (ours, want) in enumerate(zip(ours_grads, ref_grads, strict=True)):
        largest = float(want.abs().max())
        if i == 1 and dtype == torch.bfloat16:
            assert float((ours.double() - want).abs().max()) <= 4 * 2.0**-8 * 2 * largest
        else:
            torch.testing.assert_close(ours.double(), want, rtol=rtol, atol=1e-4 * largest)


@pytest.mark.parametrize("options", HALF_OPTIONS, ids=["plain", "all"])
def test_bfloat16_products_round_as_a_bfloat16_linear(small_chunks, options):
    """Where the CPU multiplies bfloat16 natively, the chunk logits and the logit gradient are
    rounded to bfloat16 by the matmuls (as a bfloat16 nn.Linear rounds its logits): against
    float64, the loss is off by at most that rounding of the largest logit (2^-8 of it) plus
    its own rounding to bfloat16, each gradient by 2^-7 (1 + max |z|) of its largest entry."""
    if float32_products(torch.bfloat16):
        pytest.skip("this CPU has no native bfloat16 matmul (previous test)")
    e, c, bias, targets = make_inputs(dtype=torch.bfloat16)
    loss, ref, ours_grads, ref_grads = run_both(e, c, bias, targets, options, "mean")
    assert loss.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in ours_grads)
    z = e.double() @ c.double().T + (bias.double() if options.get("bias") else 0)
    if options.get("softcap"):
        z = options["softcap"] * torch.tanh(z / options["softcap"])
    zmax = float(z.abs().max())
    bf16 = 2.0**-8
    torch.testing.assert_close(loss.double(), ref, rtol=bf16, atol=bf16 * zmax)
    for ours, want in zip(ours_grads, ref_grads, strict=True):
        bound = 2 * bf16 * (1 + zmax) * float(want.abs().max())
        assert float((ours.double() - want).abs().max()) <= bound


@pytest.mark.parametrize("bf16_matmul", [True, False])
def test_under_autocast_mixed_dtypes_multiply_in_bfloat16_and_give_a_float32_loss(
    bf16_matmul, monkeypatch
):
    """Under CPU autocast, bfloat16 activations meet a float32 weight as autocast's Linear meets
    them (both cast to bfloat16), the loss is float32 (as autocast's cross-entropy) and each
    gradient reaches its leaf in the leaf's dtype; also where the matmuls run in float32 (the
    weight then keeps its precision: within the same bound of the rounded definition)."""
    monkeypatch.setattr(cce.cpu, "bf16_matmul_is_faster", lambda: bf16_matmul)
    e, c, bias, targets = make_inputs()
    e = e.detach().bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fg.linear_cross_entropy(e, c, targets, bias=bias)
    assert loss.dtype == torch.float32
    # the definition on the bfloat16-rounded inputs, in float64
    eb, cb, bb = (t.detach().bfloat16().double().requires_grad_() for t in (e, c, bias))
    ref, _ = reference(eb, cb, targets, bias=bb)
    zmax = float((eb @ cb.T + bb).abs().max())
    bf16 = 2.0**-8
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=0, atol=bf16 * zmax)
    ours = grads(loss, (e, c, bias))
    want = grads(ref, (eb, cb, bb))
    for o, w, leaf in zip(ours, want, (e, c, bias), strict=True):
        assert o.dtype == leaf.dtype
        assert float((o.double() - w).abs().max()) <= 2 * bf16 * (1 + zmax) * float(w.abs().max())


def test_under_autocast_float32_matmuls_keep_the_float32_weight(monkeypatch):
    """Where the CPU's matmuls run in float32 (torch's bfloat16 matmul the slower one), the
    training pass under autocast multiplies the float32 weight and bias as they are, and its
    gradients reach them unrounded: the definition on bfloat16 e and float32 c and bias to
    float32 accuracy (rounding c to bfloat16 misses it by about 2^-9 of the logits)."""
    monkeypatch.setattr(cce.cpu, "bf16_matmul_is_faster", lambda: False)
    e, c, bias, targets = make_inputs(dim=64)
    e = e.detach().bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fg.linear_cross_entropy(e, c, targets, bias=bias)
    eb = e.detach().double().requires_grad_()
    cd, bd = (t.detach().double().requires_grad_() for t in (c, bias))
    ref, _ = reference(eb, cd, targets, bias=bd)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-6, atol=0)
    for ours, want in zip(grads(loss, (c, bias)), grads(ref, (cd, bd)), strict=True):
        assert ours.dtype == torch.float32
        torch.testing.assert_close(ours.double(), want, rtol=1e-5, atol=1e-7)


def test_default_chunking_on_a_larger_vocabulary():
    """No monkeypatching: the real chunk sizes, V not a multiple of any of them."""
    e, c, bias, targets = make_inputs(shape=(130,), dim=32, vocab=70_001)
    loss, ref, ours_grads, ref_grads = run_both(e, c, bias, targets, {"bias": True}, "mean")
    torch.testing.assert_close(loss.double(), ref, rtol=2e-5, atol=2e-5)
    for ours, want in zip(ours_grads, ref_grads, strict=True):
        torch.testing.assert_close(ours.double(), want, rtol=1e-4, atol=1e-5 * want.abs().max())


SMALL_OPTIONS = [
    {},  # c without gradient: the filter has nothing to act on
    {"bias": True, "softcap": 2.5, "filter_eps": None},
    {"shift": 2, "label_smoothing": 0.1},  # (label smoothing turns the filter off)
    {"ignore_index": 7},  # a valid id that no row holds
]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", SMALL_OPTIONS, ids=lambda o: "-".join(o) or "plain")
@pytest.mark.parametrize(
    "dtype, tol", [(torch.float32, 2e-5), (torch.float64, 1e-10), (torch.bfloat16, 1e-2)]
)
@pytest.mark.parametrize("autocast", [False, True])
def test_small_eager_calls_take_torch_cross_entropy_by_the_same_definition(
    monkeypatch, options, reduction, dtype, tol, autocast
):
    """Logits this few cost less to write than the op's call: such eager calls (every row in the
    loss, no z_loss, lse or gradient filter that could act) run F.cross_entropy on materialized
    logits in the compute dtype, which must give the op's loss and gradients."""
    monkeypatch.setattr(cce._library, "call", lambda *a: pytest.fail("the op ran"))
    monkeypatch.setattr(cce.cpu, "bf16_matmul_is_faster", lambda: True)  # autocast rounds c
    kw = dict(options)
    e, c, bias, targets = make_inputs(shape=(2, 9), dim=8, vocab=24, dtype=dtype, ignored=0.0)
    targets = torch.where(targets == 7, 8, targets)
    b = bias if kw.pop("bias", False) else None
    if kw.get("filter_eps", "auto") == "auto" and not kw.get("label_smoothing"):
        c = c.detach()
    filter_eps = kw.pop("filter_eps", "auto")
    leaves = [t for t in (e, c, b) if t is not None and t.requires_grad]
    on = autocast and dtype != torch.float64  # (autocast leaves float64 alone)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = fg.linear_cross_entropy(
            e, c, targets, bias=b, reduction=reduction, filter_eps=filter_eps, **kw
        )
    assert loss.dtype == (torch.float32 if on else dtype)
    rounded = [t.to(torch.bfloat16) if on else t for t in (e, c, b) if t is not None]
    ref, _ = reference(*rounded[:2], targets, bias=rounded[2] if b is not None else None,
                       reduction=reduction, **kw)  # fmt: skip
    assert loss.shape == ref.shape
    torch.testing.assert_close(loss.double(), ref, rtol=tol, atol=tol)
    weights = torch.linspace(0.5, 1.5, ref.numel(), dtype=torch.float64).view(ref.shape)
    ours = grads((loss.double() * weights).sum(), leaves)
    want = grads((ref * weights).sum(), leaves)
    for o, w in zip(ours, want, strict=True):
        assert o.dtype == dtype
        torch.testing.assert_close(o.double(), w.double(), rtol=tol, atol=tol * w.abs().max())


@pytest.mark.parametrize(
    "case", ["ignored row", "z_loss", "return_lse", "filter", "target out of range"]
)
def test_small_calls_the_op_answers(monkeypatch, case):
    """Small calls that torch's cross-entropy would answer otherwise stay with the op: a row out
    of the loss (torch spreads its NaN / inf into dC), z_loss and lse, a gradient filter that may
    zero dC, and a bad target (the op's message)."""
    ran = []
    call = cce._library.call
    monkeypatch.setattr(cce._library, "call", lambda *a: ran.append(1) or call(*a))
    e, c, bias, targets = make_inputs(shape=(6,), dim=8, vocab=24, ignored=0.0)
    kw = {"z_loss": {"z_loss": 1e-2}, "return_lse": {"return_lse": True}}.get(case, {})
    if case == "ignored row":
        targets[2] = IGNORE
    if case != "filter":
        c = c.detach()
    if case == "target out of range":
        targets[3] = 24
        with pytest.raises(ValueError, match=r"linear_cross_entropy: targets must be in \[0, 24"):
            fg.linear_cross_entropy(e, c, targets)
        return
    fg.linear_cross_entropy(e, c, targets, **kw)
    assert ran


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_return_lse_and_its_gradient(small_chunks, device, dtype):
    e, c, bias, targets = make_inputs(dtype=dtype, device=device)
    loss, lse = fg.linear_cross_entropy(e, c, targets, shift=2, softcap=3.0, return_lse=True)
    ref, ref_lse = reference(e, c, targets, shift=2, softcap=3.0)
    assert lse.shape == targets[..., 2:].shape and lse.dtype == dtype
    lse_tol, grad_tol = kernel_tol(device, dtype, 1e-6), kernel_tol(device, dtype, 1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=lse_tol, atol=lse_tol)
    ours = grads(loss + 0.3 * lse.sin().sum(), (e, c))
    want = [g.double() for g in grads(ref + 0.3 * ref_lse.sin().sum(), (e, c))]
    for o, w in zip(ours, want, strict=True):
        torch.testing.assert_close(o.double(), w, rtol=grad_tol, atol=grad_tol * w.abs().max())


def test_all_ignored_batch_gives_zero_loss_and_gradients(small_chunks, device):
    e, c, bias, targets = make_inputs(ignored=1.0, device=device)
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


def test_nan_and_infinities_follow_torch(small_chunks, device):
    """NaN poisons its row only; -inf bias entries (masked vocabulary) and huge logits are fine."""
    e, c, bias, targets = make_inputs(shape=(6,), ignored=0.0, device=device)
    targets[:] = torch.tensor([0, 1, 2, 3, 4, 5])
    with torch.no_grad():
        e[1, 3] = float("nan")
        e[2] *= 1e4
        bias[50:] = -float("inf")
    for softcap in (None, 5.0):
        ours = fg.linear_cross_entropy(e, c, targets, bias=bias, softcap=softcap, reduction="none")
        want, _ = reference(e, c, targets, bias=bias, softcap=softcap, reduction="none")
        assert ours[1].isnan() and not ours[[0, 2, 3, 4, 5]].isnan().any()
        tol = kernel_tol(device, torch.float32, 1e-5)
        torch.testing.assert_close(ours.double(), want, rtol=tol, atol=tol, equal_nan=True)


def torch_on_valid_rows(e, c, targets, z_loss):
    """Materialized logits through F.cross_entropy, on the non-ignored rows only (an ignored row
    takes no part in the loss, so its NaN reaches no gradient)."""
    valid = targets != IGNORE
    z = e[valid] @ c.T
    loss = F.cross_entropy(z, targets[valid])
    return loss + z_loss * (torch.logsumexp(z, -1) ** 2).mean() if z_loss else loss


@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
@pytest.mark.parametrize("filter_eps", ["auto", None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("where", ["c", "e", "ignored e"])
def test_nan_reaches_the_gradients_as_in_torch(small_chunks, device, where, dtype, filter_eps,
                                               z_loss):  # fmt: skip
    """A NaN logit gives NaN in the loss and in the gradients, at torch's positions, also where
    the filter would otherwise skip every chunk (two of three chunks are never likely)."""
    e, c, _, targets = make_inputs(shape=(4,), vocab=48, dtype=dtype, ignored=0.0, device=device)
    with torch.no_grad():
        c[:32] *= 0.01
        c[32:] *= 20.0
        # (No ignored row beside the NaN of c: its dE is 0, where torch has 0 * NaN.)
        targets.copy_(torch.tensor([32, 40, 47, 33 if where == "c" else IGNORE]))
        if where == "c":
            c[1, 3] = float("nan")
        else:
            e[3 if where == "ignored e" else 2, 5] = float("nan")
    loss = fg.linear_cross_entropy(e, c, targets, z_loss=z_loss, filter_eps=filter_eps)
    ours = grads(loss, (e, c))
    want_loss = torch_on_valid_rows(e, c, targets, z_loss)
    want = grads(want_loss, (e, c))
    assert loss.isnan() == want_loss.isnan() == (where != "ignored e")
    for o, w in zip(ours, want, strict=True):
        assert torch.equal(o.isnan(), w.isnan())
        assert w.isnan().any() == (where != "ignored e")


@pytest.mark.parametrize("reduction", ["sum", "none"])  # the fused pass; the recomputing one
@pytest.mark.parametrize("shift", [0, 2])
def test_rows_out_of_the_loss_get_zero_gradient_beside_an_infinite_weight(small_chunks, shift,
                                                                        reduction):  # fmt: skip
    """Ignored rows and rows a shift drops take no part in the loss: their dE is exactly 0, also
    where C holds an inf (their zero logit gradient times it was NaN; a fuzz case). The other
    rows' gradients follow torch's on the rows in the loss, NaN where torch has it."""
    torch.manual_seed(0)
    e = torch.randn(2, 6, 8, dtype=torch.float64)
    e[..., 1] = e[..., 1].abs() + 0.1  # the inf of C gives a -inf logit, p = 0
    c = torch.randn(20, 8, dtype=torch.float64)
    c[3, 1] = -float("inf")
    targets = torch.randint(4, 20, (2, 6))
    targets[0, 4] = IGNORE
    e.requires_grad_(), c.requires_grad_()
    loss = fg.linear_cross_entropy(e, c, targets, shift=shift, reduction=reduction)
    ours = grads(loss.sum(), (e, c))
    used = targets[:, shift:] != IGNORE
    rows = e[:, : 6 - shift][used]
    want_loss = F.cross_entropy(rows @ c.T, targets[:, shift:][used], reduction="sum")
    want = grads(want_loss, (e, c))
    torch.testing.assert_close(loss.sum(), want_loss)
    out = torch.ones(2, 6, dtype=torch.bool)
    out[:, : 6 - shift] = ~used
    assert torch.equal(ours[0][out], torch.zeros_like(ours[0][out]))
    torch.testing.assert_close(ours[0][~out], want[0][~out], equal_nan=True)
    assert ours[0][~out].isnan().any()  # torch's 0 * inf in the rows of the loss
    torch.testing.assert_close(ours[1], want[1], equal_nan=True)


@pytest.mark.parametrize("rows", [1, 600])  # torch's small path; the chunk loops
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_positive_infinite_logit_gives_torchs_nan_on_every_path(rows, dtype):
    """A +inf logit (an inf in c): torch's cross-entropy is NaN for that row (its log-softmax
    subtracts the max, inf - inf), its logsumexp +inf. The recomputing loop's row loss
    lse - z_t gave +inf where the others gave NaN (a fuzz case)."""
    torch.manual_seed(0)
    e = torch.rand(rows, 16, dtype=dtype) + 0.1
    c = torch.randn(30, 16, dtype=dtype)
    c[7, 3] = float("inf")
    targets = torch.randint(0, 30, (rows,))
    want = F.cross_entropy(e @ c.T, targets, reduction="none")
    assert bool(want.isnan().all())
    for reduction in ("none", "sum", "mean"):
        for grad in (False, True):
            x = e.clone().requires_grad_(grad)
            loss = fg.linear_cross_entropy(x, c, targets, reduction=reduction)
            assert bool(loss.isnan().all()), (reduction, grad)
    loss, lse = fg.linear_cross_entropy(e, c, targets, reduction="none", return_lse=True)
    assert bool(loss.isnan().all())
    assert torch.equal(lse, torch.logsumexp(e @ c.T, -1))  # +inf, as torch's logsumexp


@pytest.mark.parametrize("reduction", ["sum", "none"])  # the fused pass; the recomputing one
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # Rust kernels; reference.py
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_a_softcapped_row_out_of_the_loss_keeps_its_inf_out_of_dc(small_chunks, reduction, dtype,
                                                                 bad):  # fmt: skip
    """An inf in a row of e that a shift drops (or that is ignored): under softcap its logits
    are capped to finite values, so its lse is finite too, and that row was still multiplied
    into dC (0 * inf: a NaN column of dC; a fuzz case). The gradients equal those of the
    rows in the loss alone, in torch ops."""
    torch.manual_seed(0)
    e = torch.randn(2, 6, 8, dtype=dtype)
    targets = torch.randint(4, 20, (2, 6))
    targets[1, 3] = IGNORE
    e[0, 5, 2] = bad  # dropped by the shift
    e[1, 1, 4] = bad  # its target (position 3) ignored
    c = torch.randn(20, 8, dtype=dtype, requires_grad=True)
    e.requires_grad_()
    loss = fg.linear_cross_entropy(
        e, c, targets, reduction=reduction, shift=2, softcap=3.0, z_loss=0.5
    ).sum()
    ours = grads(loss, (e, c))
    # The rule in torch ops on the rows in the loss only.
    used = targets[:, 2:] != IGNORE
    capped = 3.0 * torch.tanh(e[:, :4][used] @ c.T / 3.0)
    lse = capped.logsumexp(-1)
    picked = capped.gather(1, targets[:, 2:][used][:, None])[:, 0]
    want_loss = (lse - picked + 0.5 * lse**2).sum()
    want = grads(want_loss, (e, c))
    torch.testing.assert_close(loss, want_loss)
    for o, w in zip(ours, want, strict=True):
        assert bool(o.isfinite().all())
        torch.testing.assert_close(o, w)


@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # Rust kernels; reference.py
def test_ignored_rows_give_no_gradient_beside_a_nan_in_c(reduction, dtype):
    """Every row ignored and a NaN in C: the loss is 0 and every gradient exactly 0 (the NaN
    logits of the ignored rows times their zero coefficients were NaN in dC on the float64
    path; a fuzz case)."""
    torch.manual_seed(0)
    e = torch.randn(3, 8, dtype=dtype, requires_grad=True)
    c = torch.randn(20, 8, dtype=dtype)
    c[7, 2] = float("nan")
    c.requires_grad_()
    targets = torch.full((3,), IGNORE)
    for label_smoothing in (0.0, 1.0):
        loss = fg.linear_cross_entropy(e, c, targets, reduction=reduction, z_loss=0.5,
                                       label_smoothing=label_smoothing)  # fmt: skip
        assert torch.equal(loss, torch.zeros_like(loss))
        for g in grads(loss.sum(), (e, c)):
            assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("use_bias", [False, True])
def test_an_empty_feature_dim_gives_torchs_loss(device, dtype, use_bias):
    """D = 0: every logit is its bias (or 0), as F.cross_entropy of e @ c.T (+ bias) gives."""
    e = torch.randn(2, 3, 0, dtype=dtype, device=device, requires_grad=True)
    c = torch.randn(5, 0, dtype=dtype, device=device, requires_grad=True)
    bias = torch.randn(5, dtype=dtype, device=device, requires_grad=True) if use_bias else None
    targets = torch.tensor([[0, 4, IGNORE], [2, 2, 1]], device=device)
    loss = fg.linear_cross_entropy(e, c, targets, bias=bias)
    z = e @ c.T + (0 if bias is None else bias)
    want = F.cross_entropy(z.reshape(-1, 5), targets.reshape(-1), ignore_index=IGNORE)
    torch.testing.assert_close(loss, want)
    leaves = [e, c] + ([bias] if use_bias else [])
    for ours, theirs in zip(grads(loss, leaves), grads(want, leaves), strict=True):
        assert ours.shape == theirs.shape
        torch.testing.assert_close(ours, theirs)


def test_module_matches_functional(device):
    e, c, bias, targets = make_inputs(device=device)
    module = fg.nn.LinearCrossEntropy(softcap=3.0, shift=1, z_loss=1e-3)
    assert "softcap=3.0" in repr(module)
    torch.testing.assert_close(
        module(e, c, targets, bias),
        fg.linear_cross_entropy(e, c, targets, bias=bias, softcap=3.0, shift=1, z_loss=1e-3),
    )


def test_inputs_are_left_alone(device):
    e, c, bias, targets = make_inputs(device=device)
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
        ({"z_loss": float("inf")}, ValueError, "z_loss must be finite"),
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


# The ops: opcheck (schema, fake kernels, autograd registration, AOT dispatch) and torch.compile.


def op_inputs(device, dtype=torch.float32, bias=True, grad=True, seed=1):
    """Small (e, c, bias, targets) for the ops: 6 rows (two ignored), V = 10, D = 8."""
    g = torch.Generator().manual_seed(seed)
    e, c, b = torch.randn(6, 8, generator=g), torch.randn(10, 8, generator=g), torch.randn(10)
    leaves = [t.to(device, dtype).requires_grad_(grad) for t in (e, c, b)]
    targets = torch.tensor([0, 3, -1, 9, 5, -1], device=device)
    return leaves[0], leaves[1], leaves[2] if bias else None, targets


#: (dtype, bias, requires_grad, softcap, label_smoothing, z_loss, filter_eps)
OP_SAMPLES = {
    "plain": (torch.float32, False, True, None, 0.0, 0.0, None),
    "bias-softcap-zloss-filter": (torch.float32, True, True, 2.5, 0.0, 1e-3, 1e-7),
    "label-smoothing": (torch.float32, True, True, None, 0.1, 0.0, None),
    "float64-all": (torch.float64, True, True, 3.0, 0.2, 1e-2, None),
    "bfloat16-no-grad": (torch.bfloat16, True, False, None, 0.0, 0.0, 1e-3),
}


@pytest.mark.parametrize("sample", OP_SAMPLES.values(), ids=OP_SAMPLES.keys())
def test_opcheck_forward(device, sample):
    dtype, bias, grad, *options = sample
    args = (*op_inputs(device, dtype, bias, grad), *options)
    torch.library.opcheck(cce.linear_cross_entropy_op, args)


@pytest.mark.parametrize("bias_grad", [True, False])
@pytest.mark.parametrize("sample", OP_SAMPLES.values(), ids=OP_SAMPLES.keys())
def test_opcheck_backward(device, sample, bias_grad):
    dtype, bias, _, softcap, label_smoothing, z_loss, filter_eps = sample
    e, c, b, targets = op_inputs(device, dtype, bias, grad=False)
    _, lse = cce.linear_cross_entropy_op(
        e, c, b, targets, softcap, label_smoothing, z_loss, filter_eps
    )
    coefs = torch.rand(3, 6, generator=torch.Generator().manual_seed(2)).to(device, lse.dtype)
    args = (e, c, b, targets, lse, *coefs, softcap, filter_eps, bias_grad and bias)
    torch.library.opcheck(cce.linear_cross_entropy_backward_op, args)


@pytest.mark.parametrize("wanted", [(True, True, True), (True, False, False), (False, True, True)])
@pytest.mark.parametrize("sample", OP_SAMPLES.values(), ids=OP_SAMPLES.keys())
def test_opcheck_fused(device, sample, wanted):
    dtype, bias, grad, *options = sample
    e, c, b, targets = op_inputs(device, dtype, bias, grad)
    flags = (*wanted[:2], wanted[2] and bias)
    divisor = torch.tensor(4, device=device)
    args = (e, c, b, targets, divisor, *options, *flags)
    torch.library.opcheck(cce.linear_cross_entropy_fused_op, args)


def matmul_passes(fn, n, v, d) -> float:
    """The multiply-adds of the matmuls ``fn`` runs, in units of one [n, d] x [d, v] product."""
    with torch.profiler.profile(record_shapes=True) as prof:
        fn()
    macs = 0
    for event in prof.events():
        if event.name in ("aten::mm", "aten::addmm", "aten::addmm_"):
            shapes = event.input_shapes
            a, b = shapes[:2] if event.name == "aten::mm" else shapes[1:3]
            macs += a[0] * a[1] * b[1]
    return macs / (n * v * d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_summed_loss_takes_its_gradients_in_three_matmul_passes(small_chunks, dtype):
    """The fused pass: 3 passes (logits, dE, dC) where forward + recomputing backward take 4;
    2 when c needs no gradient; 1 without any gradient; reduction "none" keeps the 4."""
    e, c, bias, targets = make_inputs(shape=(150,), vocab=100, dim=24, dtype=dtype)

    def step(reduction="mean", leaves=(e, c)):
        loss = fg.linear_cross_entropy(e, c, targets, reduction=reduction, filter_eps=None)
        grads(loss.sum(), leaves)

    assert matmul_passes(step, 150, 100, 24) == 3
    assert matmul_passes(lambda: step("none"), 150, 100, 24) == 4
    assert matmul_passes(lambda: step(leaves=(e,)), 150, 100, 24) == 3  # c still asked for
    c.requires_grad_(False)
    assert matmul_passes(lambda: step(leaves=(e,)), 150, 100, 24) == 2
    with torch.no_grad():
        assert matmul_passes(lambda: fg.linear_cross_entropy(e, c, targets), 150, 100, 24) == 1


def test_the_fused_gradients_scale_with_the_upstream_gradient(small_chunks):
    """The saved gradients times any upstream gradient, also through retain_graph twice."""
    e, c, bias, targets = make_inputs(shape=(2, 50), vocab=100)
    loss = fg.linear_cross_entropy(e, c, targets, bias=bias, z_loss=1e-3)
    plain = torch.autograd.grad(loss, (e, c, bias), retain_graph=True)
    scaled = torch.autograd.grad(loss * -2.5, (e, c, bias), retain_graph=True)
    again = torch.autograd.grad(loss * -2.5, (e, c, bias))
    for p, s, a in zip(plain, scaled, again, strict=True):
        torch.testing.assert_close(s, -2.5 * p)
        torch.testing.assert_close(a, s, rtol=0, atol=0)
    # .grad accumulation over a kept graph never meets the saved gradients changed
    loss = fg.linear_cross_entropy(e, c, targets, bias=bias, z_loss=1e-3)
    for _ in range(2):
        loss.backward(retain_graph=True)
    (loss * 0.5).backward()
    for leaf, p in zip((e, c, bias), plain, strict=True):
        torch.testing.assert_close(leaf.grad, 2.5 * p)


def test_fused_and_recomputed_gradients_agree(small_chunks):
    """The summed loss through the fused pass and through the per-row ops, in bfloat16
    (matmuls as a bfloat16 nn.Linear's where the CPU has them) and float32."""
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 2.0**-6)):
        e, c, bias, targets = make_inputs(shape=(150,), vocab=100, dtype=dtype)
        kw = {"bias": bias, "softcap": 3.0, "label_smoothing": 0.1, "z_loss": 1e-3}
        fused = grads(fg.linear_cross_entropy(e, c, targets, **kw), (e, c, bias))
        rows = fg.linear_cross_entropy(e, c, targets, reduction="none", **kw)
        valid = (targets != IGNORE).sum()
        recomputed = grads(rows.float().sum() / valid, (e, c, bias))
        for f, r in zip(fused, recomputed, strict=True):
            torch.testing.assert_close(f, r, rtol=tol, atol=tol * float(r.abs().max()))


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def loss_outputs_and_grads(fn, e, c, targets, bias):
    """The loss (and lse), and the gradients of a weighted sum of them towards e, c and bias;
    ``fn`` is called as nn.LinearCrossEntropy is."""
    out = fn(e, c, targets, bias)
    loss, lse = out if isinstance(out, tuple) else (out, None)
    weights = torch.linspace(0.5, 1.5, loss.numel(), device=loss.device).view(loss.shape)
    objective = (loss * weights).sum() + (0 if lse is None else 0.3 * lse.sin().sum())
    leaves = [t for t in (e, c, bias) if t is not None]
    return [t.detach() for t in (loss, lse) if t is not None], grads(objective, leaves)


def assert_compiled_matches_eager(fn, inputs, backend):
    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    want_out, want_grads = loss_outputs_and_grads(fn, *inputs)
    got_out, got_grads = loss_outputs_and_grads(compiled, *inputs)
    for got, want in zip(got_out + list(got_grads), want_out + list(want_grads), strict=True):
        torch.testing.assert_close(got, want)


ALL_OPTIONS = {"bias": True, "softcap": 4.0, "label_smoothing": 0.2, "z_loss": 1e-3, "shift": 1}
COMPILE_CASES = [
    *(({}, reduction) for reduction in ("mean", "sum", "none")),
    *((ALL_OPTIONS | {"return_lse": True}, reduction) for reduction in ("mean", "sum", "none")),
    ({"softcap": 2.5}, "mean"),
    ({"label_smoothing": 0.1}, "sum"),
    ({"z_loss": 1e-2}, "mean"),
    ({"shift": 2, "bias": True}, "none"),
    ({"return_lse": True, "filter_eps": None}, "mean"),
]


@pytest.mark.parametrize(
    "options, reduction",
    COMPILE_CASES,
    ids=["-".join([*options, reduction]) for options, reduction in COMPILE_CASES],
)
def test_compiled_matches_eager(fresh_dynamo, device, options, reduction):
    """fullgraph: no data-dependent guard anywhere; loss, lse and gradients as in eager."""
    kw = dict(options)
    use_bias = kw.pop("bias", False)

    def loss(e, c, targets, bias):
        return fg.linear_cross_entropy(e, c, targets, bias=bias, reduction=reduction, **kw)

    e, c, bias, targets = make_inputs(shape=(2, 9), dim=16, vocab=40, device=device)
    assert_compiled_matches_eager(loss, (e, c, targets, bias if use_bias else None), "aot_eager")


def test_compiled_under_autocast_is_one_graph(fresh_dynamo):
    """Under CPU bf16 autocast the op asks which dtype torch's matmul is faster in: a constant
    to torch.compile (traced into, its timing and backend probe were graph breaks)."""

    def loss(e, c, targets, bias):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return fg.linear_cross_entropy(e, c, targets, bias=bias)

    e, c, bias, targets = make_inputs(shape=(2, 9), dim=16, vocab=40)
    assert_compiled_matches_eager(loss, (e, c, targets, bias), "aot_eager")


def test_compiled_with_inductor(fresh_dynamo, device):
    def loss(e, c, targets, bias):
        return fg.linear_cross_entropy(
            e, c, targets, bias=bias, softcap=3.0, label_smoothing=0.1, z_loss=1e-3, shift=1,
            reduction="none", return_lse=True,
        )  # fmt: skip

    e, c, bias, targets = make_inputs(shape=(2, 9), dim=16, vocab=40, device=device)
    assert_compiled_matches_eager(loss, (e, c, targets, bias), "inductor")


def test_module_compiles(fresh_dynamo, device):
    module = fg.nn.LinearCrossEntropy(softcap=3.0, shift=1, label_smoothing=0.1)
    e, c, bias, targets = make_inputs(shape=(2, 9), dim=16, vocab=40, device=device)
    assert_compiled_matches_eager(module, (e, c, targets, bias), "inductor")


def test_compiled_graph_refuses_out_of_range_targets(fresh_dynamo, device):
    """The eager check does not run in a graph: the CPU kernel raises, the GPU kernel (which
    cannot without a device sync) gives the row a NaN loss."""
    e, c, bias, targets = make_inputs(shape=(2, 9), dim=16, vocab=40, device=device)
    compiled = torch.compile(fg.linear_cross_entropy, fullgraph=True, backend="aot_eager")
    compiled(e, c, targets)
    targets[1, 3] = 40
    if device == "cpu":
        with pytest.raises(ValueError, match=r"linear_cross_entropy: targets must be in \[0, 40\)"):
            compiled(e, c, targets)
    else:
        assert compiled(e, c, targets, reduction="none")[1, 3].isnan()


def test_bad_input_under_compile_keeps_its_error(fresh_dynamo):
    """Without fullgraph the check runs as in eager (with it, torch reports the ValueError inside
    its own error about an exception in the graph)."""
    e, c, _, targets = make_inputs()
    with pytest.raises(ValueError, match="linear_cross_entropy: reduction must be one of"):
        torch.compile(fg.linear_cross_entropy, backend="aot_eager")(e, c, targets, reduction="max")


def loss_and_grads_in(dtype, fn, e, c, bias, targets, **kw):
    leaves = [t.detach().to(dtype).requires_grad_() for t in (e, c, bias)]
    loss = fn(*leaves, targets, **kw)
    return [loss.detach().double(), *(g.double() for g in torch.autograd.grad(loss, leaves))]


def torch_loss(e, c, bias, targets, softcap=None, label_smoothing=0.0):
    z = e @ c.T + bias
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return F.cross_entropy(z.float() if z.dtype != torch.float64 else z, targets,
                           label_smoothing=label_smoothing)  # fmt: skip


def our_loss(e, c, bias, targets, **kw):
    return fg.linear_cross_entropy(e, c, targets, bias=bias, **kw)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("options", [{}, {"softcap": 20.0}, {"label_smoothing": 0.1}])
def test_matches_float64_as_well_as_torch_does(device, dtype, options):
    """ml-cross-entropy's criterion on a GPU: ours as close to float64 as torch in dtype, for
    the loss and every gradient (float32: close to float64)."""
    if device == "cpu" and dtype != torch.float32:
        pytest.skip("CPU 16-bit inputs: test_half_inputs_are_computed_in_float32")
    g = torch.Generator(device=device).manual_seed(0)
    n, d, v = (777, 256, 50_001) if device == "cuda" else (77, 64, 5_001)  # no block multiple
    e = torch.randn(n, d, device=device, generator=g)
    c = torch.randn(v, d, device=device, generator=g) / d**0.5
    bias = torch.randn(v, device=device, generator=g) * 0.1
    targets = torch.randint(0, v, (n,), device=device, generator=g)
    targets[::5] = -100
    ref = loss_and_grads_in(torch.float64, torch_loss, e, c, bias, targets, **options)
    base = loss_and_grads_in(dtype, torch_loss, e, c, bias, targets, **options)
    # The filter (on by default) may drop contributions below eps; its rule has its own tests.
    got = loss_and_grads_in(dtype, our_loss, e, c, bias, targets, filter_eps=None, **options)
    loss, *grads = zip(ref, base, got, strict=True)
    r, b, o = loss
    if dtype == torch.float32:  # both near float64: compare with it directly
        torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-5 * r.abs().max().item())
    else:  # the loss comes back in e's dtype (torch's here is float32: its logits are upcast
        # first): rounded once more than torch's, by at most half an ulp of that dtype
        assert (r - o).abs() <= (r - b).abs() + torch.finfo(dtype).eps / 2 * r.abs()
    for name, (r, b, o) in zip(("dE", "dC", "dbias"), grads, strict=True):
        # Both round float32 sums of the same 16-bit products once: elementwise either may
        # land an ulp off the other, so the kernels' criterion (assert_as_good_as_torch).
        assert_as_good_as_torch(o, r, b, dtype, f"{name} {dtype}")


# kernels/cce.cu's launches against float64 torch, by ml-cross-entropy's criterion: elementwise
# |ref64 - ours| <= |ref64 - torch in dtype| + tol (and no worse in norm) for 16-bit inputs;
# close to float64 for float32 (both near it).

needs_kernels = pytest.mark.skipif(
    not fgcuda.is_available(), reason="needs a CUDA GPU (driver and cuda-python) for kernels/cce.cu"
)
KERNEL_DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def kernel_problem(n, v, d, dtype, *, bias=True, seed=0, ignore_every=5, smoothing=0.0):
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


def kernel_logits(e, c, b, softcap, dtype):
    z = e.to(dtype) @ c.to(dtype).T
    if b is not None:
        z = z + b.to(dtype)
    return z if softcap is None else softcap * torch.tanh(z / softcap)


def kernel_reference_forward(e, c, b, targets, softcap, dtype):
    z = kernel_logits(e, c, b, softcap, dtype).double()
    picked = z.gather(1, targets.clamp_min(0)[:, None])[:, 0]
    return z.logsumexp(1), torch.where(targets >= 0, picked, 0.0), z.sum(1)


def kernel_reference_backward(e, c, b, targets, lse, coefs, softcap, dtype):
    """(dE, dC, dbias) with the logits, dz and both GEMMs in ``dtype`` (float64: the truth)."""
    z = kernel_logits(e, c, b, softcap, dtype)
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


def check_kernels(
    n, v, d, dtype, *, softcap=None, bias=True, smoothing=0.0, filter_eps=None, seed=0
):
    e, c, b, targets, coefs = kernel_problem(
        n, v, d, dtype, bias=bias, seed=seed, smoothing=smoothing
    )
    lse, z_target, z_sum = cce_forward_cuda(e, c, b, targets, softcap, True)
    assert lse.dtype == z_target.dtype == z_sum.dtype == torch.float32
    ref = kernel_reference_forward(e, c, b, targets, softcap, torch.float64)
    base = kernel_reference_forward(e, c, b, targets, softcap, dtype)
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
    ref = kernel_reference_backward(e64, c64, b64, targets, ref[0], coefs, softcap, torch.float64)
    base = kernel_reference_backward(e, c, b, targets, lse, coefs, softcap, dtype)
    for name, o, r, s in zip(("dE", "dC", "dbias"), (de, dc, db), ref, base, strict=True):
        assert_as_good_as_torch(o, r, s, dtype, f"{name} {dtype}")
    return de, dc, db


@needs_kernels
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize(
    "options",
    [{}, {"softcap": 15.0}, {"bias": False}, {"smoothing": 0.1}, {"filter_eps": 0.0}],
    ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "plain",
)
def test_kernels_match_float64_as_well_as_torch_does(dtype, options):
    check_kernels(
        777, 3001, 200, dtype, **options
    )  # no size a multiple of a tile or a 64-byte slice


@needs_kernels
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("n, v, d", [(1, 1, 8), (3, 130, 8), (64, 128, 64), (65, 257, 1032)])
def test_kernels_on_edge_shapes(dtype, n, v, d):
    check_kernels(n, v, d, dtype, softcap=30.0)


@needs_kernels
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_kernel_filter_skips_negligible_blocks_without_changing_the_result(dtype):
    """Half the vocabulary sits 40 nats below the rest (no target there): ordered by mean logit
    it fills whole blocks that the filter drops (their dbias stays exactly 0), and every
    gradient still matches float64 as well as torch does."""
    n, v, d = 300, 2048, 64
    e, c, b, targets, coefs = kernel_problem(n, v, d, dtype, ignore_every=7)
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
    lse64 = kernel_reference_forward(e64, c64, b64, targets, None, torch.float64)[0]
    ref = kernel_reference_backward(e64, c64, b64, targets, lse64, coefs, None, torch.float64)
    base = kernel_reference_backward(e, c, b, targets, lse, coefs, None, dtype)
    for name, o, r, s in zip(("dE", "dC", "dbias"), filtered, ref, base, strict=True):
        assert_as_good_as_torch(o, r, s, dtype, f"filtered {name} {dtype}")


@needs_kernels
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_kernel_filter_is_relative_to_each_rows_gradient_scale(dtype):
    """The filter compares p_ij with filter_eps, as the reference does (|cs_i p_ij| against
    filter_eps * max(|cs_i|, |ct_i|)), not |cs_i p_ij| with filter_eps: on near-flat logits
    (every p_ij ~ 1e-3) with a mean's coefficients (~1/64) filter_eps = 1e-4 drops nothing."""
    e, c, b, targets, coefs = kernel_problem(64, 1000, 64, dtype)
    e = (e.float() * 0.1).to(dtype)
    lse, _, _ = cce_forward_cuda(e, c, b, targets, None, False)
    full = cce_backward_cuda(e, c, b, targets, lse, *coefs, None, None, True)
    filtered = cce_backward_cuda(e, c, b, targets, lse, *coefs, None, 1e-4, True)
    eps = torch.finfo(dtype).eps
    for name, f, x in zip(("dE", "dC", "dbias"), filtered, full, strict=True):
        # The same sums in another order (the filter visits the vocabulary sorted).
        torch.testing.assert_close(f, x, rtol=2 * eps, atol=eps * x.abs().max().item(), msg=name)


@needs_kernels
def test_kernel_launch_errors():
    e, c, b, targets, _ = kernel_problem(4, 16, 8, torch.float16)
    with pytest.raises(ValueError, match="cce_forward_cuda: D = 12 must be a multiple of 8"):
        cce_forward_cuda(e[:, :6].repeat(1, 2), c[:, :6].repeat(1, 2), b, targets, None, False)
    with pytest.raises(TypeError, match="cce_forward_cuda: c must have e's dtype"):
        cce_forward_cuda(e, c.float(), b, targets, None, False)
    with pytest.raises(ValueError, match="cce_forward_cuda: softcap"):
        cce_forward_cuda(e, c, b, targets, -1.0, False)
    lse = torch.zeros(4, device="cuda")
    with pytest.raises(ValueError, match="cce_backward_cuda: coef_target must be a float32"):
        cce_backward_cuda(e, c, b, targets, lse, lse, lse.double(), lse, None, None, False)


def test_ops_name_mismatched_shapes():
    """The ops themselves (the public function checks first) raised torch's matmul and
    broadcast errors on mismatched shapes; now the ValueError naming op and argument."""
    e, c, t = torch.randn(8, 16), torch.randn(100, 16), torch.randint(0, 100, (8,))
    args = (None, 0.0, 0.0, None)
    op = torch.ops.ferrograd.linear_cross_entropy
    with pytest.raises(ValueError, match="linear_cross_entropy: e .N, D. and c .V, D. must share"):
        op(e, torch.randn(100, 12), None, t, *args)
    with pytest.raises(ValueError, match=r"linear_cross_entropy: bias must have shape \[100\]"):
        op(e, c, torch.randn(50), t, *args)
    with pytest.raises(ValueError, match=r"linear_cross_entropy: targets must have shape \[8\]"):
        op(e, c, None, t[:5], *args)
    loss, lse = op(e, c, None, t, *args)
    want = torch.nn.functional.cross_entropy(e.double() @ c.double().T, t, reduction="none")
    assert torch.allclose(loss.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_second_derivatives_are_refused(fused, dtype):
    """create_graph=True has no differentiable backward here (the fused pass's gradients are
    constants from the forward): a clear error, not gradients whose own derivative is
    silently lost."""
    e = torch.randn(512, 64, dtype=dtype, requires_grad=True)
    c, targets = torch.randn(1024, 64, dtype=dtype), torch.randint(0, 1024, (512,))
    loss = fg.linear_cross_entropy(e, c, targets, reduction="mean" if fused else "none")
    op = "linear_cross_entropy_fused" if fused else "linear_cross_entropy"
    with pytest.raises(NotImplementedError, match=f"{op}: a second derivative"):
        torch.autograd.grad(loss.sum(), e, create_graph=True)
