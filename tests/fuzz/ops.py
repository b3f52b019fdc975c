"""One hypothesis strategy per public op, drawing a ``Case`` (harness.py): a valid call and
its reference check, or a call with one invalid argument and the names the error must carry.
``CASES`` maps an op's name to its strategy; tests/fuzz/test_fuzz.py and campaign.py run them."""

from __future__ import annotations

import io
import math

import hypothesis.strategies as st
import numpy as np
import torch

import ferrograd as fg
from fuzz import references as ref
from fuzz.harness import Case
from fuzz.references import assert_close, eps
from fuzz.strategies import (
    BAD_FLOATS,
    BAD_INTS,
    FLOAT_DTYPES,
    INT_DTYPES,
    KERNEL_DTYPES,
    NOT_TENSORS,
    describe,
    invalid_choice,
    layouts,
    rare,
    shapes,
    values,
)

META = torch.device("meta")


def _describe_args(args: dict) -> dict:
    return {k: describe(v) for k, v in args.items()}


def _bad_tensors(x: torch.Tensor) -> list:
    """Replacements for a floating tensor argument that must be refused."""
    return [x.to(torch.int64), x.to(torch.bool), *NOT_TENSORS]


# ---- softmax / log_softmax --------------------------------------------------------------------


@st.composite
def softmax_case(draw, log: bool = False) -> Case:
    op = "log_softmax" if log else "softmax"
    fn = fg.log_softmax if log else fg.softmax
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    x, layout = draw(layouts(draw(values(draw(shapes(0, 4)), dtype, scales=(1.0, 1e-3, 30.0)))))
    rank = max(x.dim(), 1)
    dim = draw(st.integers(-rank, rank - 1))
    if draw(st.booleans()):
        dim = np.int64(dim)
    cast = draw(st.sampled_from((None, None, None, torch.float32, torch.float64, torch.bfloat16)))
    args = {"x": x, "dim": dim, "dtype": cast}
    bad = draw(
        invalid_choice(
            [("x", "x", v) for v in (_bad_tensors(x) if cast is None else NOT_TENSORS)]
            # torch.softmax casts a complex x when given a dtype (with a warning).
            + ([("x", "x", x.to(torch.complex64))] if cast is None else [])
            + [("dim", "dim", v) for v in (rank, -rank - 1, 1.0, "0", None, True)]
            + [("dtype", "dtype", v) for v in ("float32", 3)]
            + [(("dtype", "x"), "dtype", torch.int32)]
        )
    )
    invalid = None
    if bad is not None:
        names, key, value = bad
        args[key] = value
        invalid = names if isinstance(names, tuple) else (names,)
    grad = invalid is None and not rare(draw, 3) and x.numel() <= 4096
    grad = grad and (cast or dtype) in (torch.float32, torch.float64) and x.isfinite().all()
    out_dtype = cast or dtype
    gy = torch.randn(x.shape, dtype=out_dtype, generator=torch.Generator().manual_seed(1))

    def call():
        if not grad:
            return fn(**args), None
        leaf = x.detach().requires_grad_()
        y = fn(leaf, dim, dtype=cast)
        (g,) = torch.autograd.grad(y, leaf, gy)
        return y, g

    def check(result):
        y, g = result
        assert y.dtype == out_dtype, f"dtype {y.dtype} != {out_dtype}"
        xin = x.to(out_dtype)
        want = ref.softmax(xin, int(dim), log)
        assert_close(y, want, ref.softmax_tol(xin, want, int(dim), log, out_dtype), op)
        if g is not None:
            leaf = xin.double().requires_grad_()
            (g_ref,) = torch.autograd.grad(ref.softmax(leaf, int(dim), log), leaf, gy.double())
            p = want.exp() if log else want
            k = int(dim) if x.dim() else 0
            size = g_ref.abs() + p * (gy.double() * (1 if log else p)).abs().sum(k, keepdim=True)
            rel = 1e-12 if x.dtype == out_dtype == torch.float64 else max(2e-5, 2 * eps(x.dtype))
            assert_close(g, g_ref, rel * (size + gy.double().abs()) + 1e-37, f"{op} backward")

    return Case(
        call,
        [x, gy],
        (op,),
        check,
        invalid,
        desc={"layout": layout, "grad": bool(grad), **_describe_args(args)},
    )


# ---- linear_cross_entropy ---------------------------------------------------------------------

_REDUCTIONS = ("mean", "sum", "none")


@st.composite
def cce_case(draw) -> Case:
    op = "linear_cross_entropy"
    dtype = draw(st.sampled_from((torch.float32, torch.float32, torch.float64, torch.bfloat16)))
    lead = draw(shapes(0, 2, max_side=6, max_numel=64))
    d = draw(st.integers(0, 40)) if not rare(draw, 10) else draw(st.sampled_from((64, 129, 300)))
    v = draw(st.integers(1, 70)) if not rare(draw, 10) else draw(st.sampled_from((256, 1000)))
    specials = rare(draw, 6)
    e, e_layout = draw(layouts(draw(values((*lead, d), dtype, specials, scales=(1.0, 0.1)))))
    c, c_layout = draw(layouts(draw(values((v, d), dtype, specials, scales=(1.0, 0.1)))))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    ignore_index = draw(st.sampled_from((-100, -1, 0)))
    targets = torch.randint(0, v, lead, generator=g)
    drop = torch.rand(lead, generator=g) < draw(st.sampled_from((0.0, 0.3, 1.0)))
    targets = torch.where(drop, ignore_index, targets)
    targets = targets.to(draw(st.sampled_from((torch.int64, torch.int64, torch.int32))))
    bias = draw(values((v,), dtype, False)) if draw(st.booleans()) else None
    tlen = lead[-1] if lead else 0
    kwargs = {
        "bias": bias,
        "ignore_index": ignore_index,
        "softcap": draw(st.sampled_from((None, None, 0.5, 30.0))),
        "reduction": draw(st.sampled_from(_REDUCTIONS)),
        "shift": draw(st.integers(0, tlen)) if tlen and draw(st.booleans()) else 0,
        "label_smoothing": draw(st.sampled_from((0.0, 0.0, 0.1, 1.0))),
        "z_loss": draw(st.sampled_from((0.0, 0.0, 1e-4, 0.5))),
        "return_lse": draw(st.booleans()),
        "filter_eps": draw(st.sampled_from(("auto", "auto", None, 0.0, 1e-3))),
    }
    args = {"e": e, "c": c, "targets": targets, **kwargs}
    bad_targets = targets.clone()
    shift_ = kwargs["shift"]
    if bad_targets.numel() and shift_ < tlen or not lead:
        # The last target of the last row: a shift drops the first ones of every row.
        bad_targets.view(-1)[-1] = v
    else:
        bad_targets = None
    options = (
        [("e", v_) for v_ in _bad_tensors(e)]
        + [("c", v_) for v_ in (c.to(torch.int64), c[:, :0] if d else c[:, None], None)]
        + [("c", c.to(torch.float16 if dtype != torch.float16 else torch.float32))]
        + [("targets", t) for t in (targets.double(), targets[..., None], None)]
        + [("bias", b) for b in (torch.zeros(v + 1, dtype=dtype), torch.zeros(v, 1, dtype=dtype))]
        + [("reduction", r) for r in ("avg", None, 1)]
        + [("shift", s) for s in (-1, tlen + 1, 1.0, True)]
        + [("softcap", s) for s in (0.0, -1.0, math.inf, math.nan, "1")]
        + [("label_smoothing", s) for s in (-0.1, 1.5, math.nan, "0")]
        + [("z_loss", s) for s in (-1.0, math.nan, math.inf, None)]
        + [("filter_eps", s) for s in ("fast", 2.0, -1.0, math.nan)]
        + [("ignore_index", s) for s in (1.5, None, "x")]
    )
    if bad_targets is not None:
        options.append(("targets", bad_targets))
    if v > 1:
        options.append(("c", c[1:1]))
    bad = draw(invalid_choice(options))
    invalid = None
    if bad is not None:
        args[bad[0]] = bad[1]
        invalid = (bad[0],)
    grad = invalid is None and dtype in (torch.float32, torch.float64) and rare(draw, 2)

    def call():
        if not grad:
            return fg.linear_cross_entropy(**args), None
        leaves = [e.detach().requires_grad_(), c.detach().requires_grad_()]
        out = fg.linear_cross_entropy(leaves[0], leaves[1], targets, **kwargs)
        loss = out[0] if kwargs["return_lse"] else out
        return out, torch.autograd.grad(loss.sum(), leaves)

    def reference(e_, c_):
        return ref.cross_entropy(
            e_, c_, targets, bias, ignore_index, kwargs["softcap"], kwargs["reduction"],
            kwargs["shift"], kwargs["label_smoothing"], kwargs["z_loss"],
        )  # fmt: skip

    def check(result):
        out, grads = result
        want_loss, want_lse = reference(e, c)
        got_loss, got_lse = out if kwargs["return_lse"] else (out, None)
        assert got_loss.dtype == dtype, f"loss dtype {got_loss.dtype}"
        logits = e.double().abs() @ c.double().abs().T
        if bias is not None:
            logits = logits + bias.double().abs()
        logits = logits.nan_to_num(0.0, 0.0, 0.0)
        size = (logits.amax(-1) if v and logits.numel() else torch.zeros(lead)) + 1
        # bfloat16 logits are rounded to bfloat16 by the matmul (as torch's are): each is off
        # by up to 2^-9 of the largest, and a row's loss takes two of them (lse and the target
        # logit, or the mean logit).
        k = 4e-3 if dtype == torch.bfloat16 else (1e-10 if dtype == torch.float64 else 1e-5)
        if float(size.max()) > torch.finfo(torch.float32).max if size.numel() else False:
            # Logits past float32's range overflow in any float32 / bfloat16 matmul, torch's
            # too: an inf or NaN there is what every implementation gives; finite values are
            # still checked.
            want_loss = torch.where(got_loss.isfinite(), want_loss, got_loss.double())
            if got_lse is not None:
                want_lse = torch.where(got_lse.isfinite(), want_lse, got_lse.double())
        z = kwargs["z_loss"]
        scale = size * (1 + 2 * z * size)
        if kwargs["reduction"] == "none":
            tol = k * (scale[..., : scale.shape[-1] - kwargs["shift"]] if lead else scale)
        else:
            tol = k * float(scale.sum()) if scale.numel() else k
        rounding = 2 * eps(dtype)
        assert_close(got_loss, want_loss, tol + rounding * want_loss.abs(), f"{op} loss")
        if got_lse is not None:
            tol = k * (size[..., : size.shape[-1] - kwargs["shift"]] if lead else size)
            assert_close(got_lse, want_lse, tol + rounding * want_lse.abs(), f"{op} lse")
        if grads is not None:
            leaves = [e.double().requires_grad_(), c.double().requires_grad_()]
            loss, _ = reference(*leaves)
            want = torch.autograd.grad(loss.sum(), leaves, allow_unused=True)
            for name, got_g, want_g in zip(("e", "c"), grads, want, strict=True):
                if want_g is None:
                    want_g = torch.zeros_like(leaves[0 if name == "e" else 1])
                if not bool(want_g.isfinite().all()):
                    # NaN or inf in the exact gradient: it must show in ours (defect 1), unless
                    # every token is ignored (torch's NaN then comes from 0 * inf alone).
                    if bool(want_loss.ne(0).any()):
                        assert not bool(got_g.isfinite().all()), f"{op}: d{name} lost a NaN/inf"
                    continue
                top = want_g.abs().max().item() if want_g.numel() else 0.0
                # Exact cancellations (identical rows of c) leave float32 residues of the
                # size of the other operand.
                # (e's ignored rows may hold NaN / inf: they are out of the loss)
                other = (c if name == "e" else e).double().abs().nan_to_num(0.0, 0.0, 0.0)
                top += other.max().item() if other.numel() else 0.0
                # float32 logits of magnitude L carry L * eps absolute error into p.
                k_g = (
                    1e-9
                    if dtype == torch.float64
                    else 2e-4 + 8 * eps(dtype) * float(size.max())
                    if size.numel()
                    else 2e-4
                )
                assert_close(got_g, want_g, k_g * (top + want_g.abs()) + 1e-30, f"{op} d{name}")

    return Case(
        call,
        [e, c, targets, bias],
        (op,),
        check,
        invalid,
        desc={"layouts": (e_layout, c_layout), "grad": bool(grad), **_describe_args(args)},
    )


# ---- ShiftQuant -------------------------------------------------------------------------------

_GROUP_SIZES = (4, 8, 32, 64, 128, 1024)
_BAD_BITS = (1, 9, 0, -8, 8.0, True, None, "8")
_BAD_GROUPS = (0, 6, -64, 2**62, 2**64, 64.0, None, "64")


@st.composite
def shiftquant_case(draw) -> Case:
    op = "shiftquant"
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    x, layout = draw(layouts(draw(values(draw(shapes(0, 3)), dtype))))
    bits = draw(st.integers(2, 8))
    group_size = draw(st.sampled_from(_GROUP_SIZES))
    rounding = draw(st.sampled_from(("nearest", "stochastic")))
    seed = draw(st.sampled_from((None, 0, 7, 2**63, 2**64 + 5)))
    args = {"x": x, "bits": bits, "group_size": group_size, "rounding": rounding, "seed": seed}
    bad = draw(
        invalid_choice(
            [("x", v) for v in _bad_tensors(x)]
            + [("x", torch.zeros(2, 4, device=META))]
            + [("bits", v) for v in _BAD_BITS]
            + [("group_size", v) for v in _BAD_GROUPS]
            + [("rounding", v) for v in ("round", None, "Nearest")]
            + [("seed", v) for v in (1.5, "1", True)]
        )
    )
    invalid, errors = None, (ValueError, TypeError)
    if bad is not None:
        args[bad[0]] = bad[1]
        invalid = (bad[0],)
        if isinstance(bad[1], torch.Tensor) and bad[1].device == META:
            errors = (ValueError, TypeError, NotImplementedError)

    def check(q):
        assert isinstance(q, fg.ShiftQuantTensor), type(q).__name__
        assert (q.bits, q.group_size) == (bits, group_size), "bits / group_size not kept"
        ref.shiftquant_rule_check(x, q, bits, group_size, rounding == "stochastic")

    return Case(
        lambda: fg.shiftquant(**args),
        [x],
        (op,),
        check,
        invalid,
        errors,
        desc={"layout": layout, **_describe_args(args)},
    )


def _replace(q: fg.ShiftQuantTensor, **fields) -> fg.ShiftQuantTensor:
    values_ = {f: getattr(q, f) for f in ("codes", "scale", "shifts", "bits", "group_size")}
    return fg.ShiftQuantTensor(**{**values_, **fields})


def _bad_operands(q: fg.ShiftQuantTensor) -> list:
    """ShiftQuantTensors whose fields are inconsistent or of the wrong type."""
    bad_shifts = q.shifts.clone()
    if bad_shifts.numel():
        bad_shifts.view(-1)[0] = 16
    out = [
        _replace(q, codes=q.codes.to(torch.int16)),
        _replace(q, codes=q.codes.numpy()),
        _replace(q, scale=q.scale.double()),
        _replace(q, shifts=q.shifts.to(torch.int32)),
        _replace(q, shifts=q.shifts[..., :0] if q.shifts.shape[-1] else q.shifts[..., None]),
        _replace(q, group_size=6),
        _replace(q, group_size=0),
    ]
    if bad_shifts.numel():
        out.append(_replace(q, shifts=bad_shifts))
    return out


@st.composite
def dequantize_case(draw) -> Case:
    """ShiftQuantTensor.dequantize on a quantized tensor, or on one with a corrupted field."""
    op = "ShiftQuantTensor.dequantize"
    x = draw(values(draw(shapes(1, 3)), torch.float32))
    bits, group_size = draw(st.integers(2, 8)), draw(st.sampled_from(_GROUP_SIZES))
    q = fg.shiftquant(x, bits, group_size)
    bad = draw(invalid_choice(_bad_operands(q), one_in=2))
    if bad is None:
        qmax = 2 ** (bits - 1) - 1

        def check(got):
            codes = q.codes.double()
            k = q.shifts.double().repeat_interleave(group_size, -1)[..., : x.shape[-1]]
            want = (codes * q.scale.double()[..., None] * torch.exp2(-k)).float().double()
            assert_close(got, want, 0.0, op)
            assert int(q.codes.abs().max()) <= qmax if q.codes.numel() else True

        return Case(
            q.dequantize, [q], (op, "shiftquant_dequantize"), check, desc={"x": describe(x)}
        )
    names = ("codes", "scale", "shifts", "group_size")
    return Case(
        bad.dequantize,
        [bad],
        (op, "shiftquant_dequantize", "ShiftQuantTensor"),
        invalid=names,
        desc={"x": describe(x), "bad": repr(bad)[:200]},
    )


@st.composite
def shiftquant_matmul_case(draw) -> Case:
    op = "shiftquant_matmul"
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    lead = draw(shapes(0, 2, max_side=7, max_numel=256))
    k = draw(st.integers(0, 70)) if not rare(draw, 8) else draw(st.sampled_from((255, 1000)))
    n = draw(st.integers(0, 9))
    a = draw(values((*lead, k), dtype))
    b = draw(values((n, k), dtype))
    group_size = draw(st.sampled_from(_GROUP_SIZES))
    a_q = fg.shiftquant(a, draw(st.integers(2, 8)), group_size)
    b_q = fg.shiftquant(b, draw(st.integers(2, 8)), group_size)
    args = {"a_q": a_q, "b_q": b_q}
    options = [("a_q", v) for v in (a, None, *(_bad_operands(a_q) if a.dim() > 1 else []))]
    options += [("b_q", v) for v in (b, *_bad_operands(b_q))]
    options.append(("b_q", fg.shiftquant(b[:, : k // 2] if k > 1 else b[:, None], 8, group_size)))
    if b.dim() and n:
        options.append(("b_q", fg.shiftquant(b[0], 8, group_size)))
    options.append(("group", (a_q, fg.shiftquant(b, 8, group_size * 2))))
    bad = draw(invalid_choice(options))
    invalid = None
    if bad is not None:
        if bad[0] == "group":
            args["a_q"], args["b_q"] = bad[1]
            invalid = ("group", "group_size", "group sizes")
        else:
            args[bad[0]] = bad[1]
            invalid = (bad[0], "K", "codes", "scale", "shifts", "group sizes", "group_size")

    def check(got):
        assert got.dtype == torch.float32, f"dtype {got.dtype}"
        da, db = a_q.dequantize().double(), b_q.dequantize().double()
        want = da @ db.T
        # The integer GEMM equals the float product of the dequantized operands up to float32
        # rounding (docs/definitions.md); a row whose scale is NaN (NaN or inf in it) is NaN.
        tol = 4 * eps(torch.float32) * (da.abs() @ db.abs().T) + 1e-45
        nan_rows = a_q.scale.isnan()[..., None] | b_q.scale.isnan()[None, :].reshape(
            *([1] * len(lead)), n
        )
        want = torch.where(nan_rows, math.nan, want)
        assert_close(got, want, tol, op)

    return Case(
        lambda: fg.shiftquant_matmul(**args),
        [a_q, b_q, bad],
        (op,),
        check,
        invalid,
        desc={"a": describe(a), "b": describe(b), "group_size": group_size, "bad": repr(bad)[:200]},
    )


@st.composite
def shiftquant_linear_case(draw) -> Case:
    op = "ShiftQuantLinear"
    in_f = draw(st.integers(0, 40)) if not rare(draw, 8) else draw(st.sampled_from((129, 300)))
    out_f = draw(st.integers(0, 12))
    ctor = {
        "in_features": in_f,
        "out_features": out_f,
        "bias": draw(st.booleans()),
        "bits": draw(st.integers(2, 8)),
        "grad_bits": draw(st.sampled_from((None, 2, 4, 8))),
        "group_size": draw(st.sampled_from(_GROUP_SIZES)),
    }
    dtype = draw(st.sampled_from((torch.float32, torch.float32, torch.float64, torch.bfloat16)))
    lead = draw(shapes(0, 2, max_side=6, max_numel=64))
    x, layout = draw(layouts(draw(values((*lead, in_f), dtype))))
    bad_ctor = draw(
        invalid_choice(
            [("in_features", v) for v in (-1, 2.5, None, "4")]
            + [("out_features", v) for v in (-3, 1.0)]
            + [("bits", v) for v in _BAD_BITS]
            + [("grad_bits", v) for v in (1, 9, 4.0)]
            + [("group_size", v) for v in _BAD_GROUPS]
        )
    )
    bad_x = None
    if bad_ctor is None:
        bad_x = draw(
            invalid_choice([*_bad_tensors(x), torch.zeros(*lead, in_f + 1, dtype=dtype)], 4)
        )
    torch.manual_seed(draw(st.integers(0, 2**31 - 1)))
    if bad_ctor is not None:
        kw = {**ctor, bad_ctor[0]: bad_ctor[1]}
        return Case(
            lambda: fg.nn.ShiftQuantLinear(**kw)(x),
            [x],
            (op, "shiftquant_linear"),
            invalid=(bad_ctor[0],),
            desc={"ctor": repr(kw), "x": describe(x)},
        )
    layer = fg.nn.ShiftQuantLinear(**ctor)
    if bad_x is not None:
        return Case(
            lambda: layer(bad_x),
            [layer, bad_x],
            (op, "shiftquant_linear"),
            invalid=("x", "in_features"),
            desc={"ctor": repr(ctor), "x": describe(bad_x)},
        )
    grad = ctor["in_features"] > 0 and x.isfinite().all() and draw(st.booleans())
    # Without gradients the layer keeps its weight's codes: a second call reuses them.
    kept = not grad and draw(st.booleans())
    gy = torch.randn((*lead, out_f), generator=torch.Generator().manual_seed(2), dtype=dtype)

    def call():
        if kept:
            with torch.no_grad():
                layer(x)
                return layer(x), None
        if not grad:
            return layer(x), None
        leaf = x.detach().requires_grad_()
        y = layer(leaf)
        return y, torch.autograd.grad(y, [leaf, layer.weight], gy)

    def check(result):
        y, grads = result
        assert y.dtype == dtype, f"dtype {y.dtype} != {dtype}"
        w = layer.weight.detach().double()
        xd = x.double()
        want = xd @ w.T
        if layer.bias is not None:
            want = want + layer.bias.detach().double()
        # Quantization error bounds per row (each operand rounded to nearest at ``bits`` along
        # the GEMM's reduction axis): ex [..., 1] for x's rows, ew [N] for weight's.
        ex = ref.shiftquant_error_bound(x.float(), ctor["bits"], False)
        ew = ref.shiftquant_error_bound(w, ctor["bits"], False)[:, 0]
        xa = xd.abs()
        tol = ex * w.abs().sum(-1) + ew * xa.sum(-1, keepdim=True) + in_f * ex * ew
        tol = tol + 1e-5 * (xa @ w.abs().T) + 2 * eps(dtype) * want.abs()
        special = (
            ~x.isfinite().all(-1, keepdim=True) if in_f else torch.zeros((*lead, 1), dtype=bool)
        )
        want = torch.where(special, math.nan, want)
        assert_close(y, want, torch.where(special, 0.0, tol) + 1e-30, op)
        if grads is not None:
            gd = gy.double()
            gbits = ctor["grad_bits"] or ctor["bits"]
            g2, x2 = gd.reshape(math.prod(lead), out_f), xd.reshape(math.prod(lead), in_f)
            # dX reduces over N (dY's rows, W's columns), dW over tokens (columns of both).
            eg = ref.shiftquant_error_bound(gd, gbits, True)
            ewt = ref.shiftquant_error_bound(w.T, ctor["bits"], False)[:, 0]
            dx_tol = eg * w.abs().sum(0) + ewt * gd.abs().sum(-1, keepdim=True) + out_f * eg * ewt
            dx_tol = dx_tol + 1e-5 * (gd.abs() @ w.abs()) + 2 * eps(dtype) * (gd @ w).abs()
            assert_close(grads[0], gd @ w, dx_tol + 1e-30, f"{op} dx")
            rows = g2.shape[0]
            egt = ref.shiftquant_error_bound(g2.T, gbits, True)
            ext = ref.shiftquant_error_bound(x2.T, ctor["bits"], False)[:, 0]
            dw_tol = egt * x2.abs().sum(0) + ext * g2.abs().sum(0)[:, None] + rows * egt * ext
            dw_tol = dw_tol + 1e-5 * (g2.abs().T @ x2.abs())
            assert_close(grads[1], g2.T @ x2, dw_tol + 1e-30, f"{op} dweight")

    return Case(
        call,
        [layer, x, gy],
        (op, "shiftquant_linear"),
        check,
        desc={
            "ctor": repr(ctor),
            "layout": layout,
            "grad": bool(grad),
            "kept": kept,
            "x": describe(x),
        },
    )


# ---- L1 norms ---------------------------------------------------------------------------------

_BAD_EPS = (0.0, -1e-5, math.nan, math.inf, "1e-5", None, True)


@st.composite
def l1norm_case(draw, kind: str) -> Case:
    """kind: "L1LayerNorm" / "L1RMSNorm" (modules) or "l1_layer_norm" / "l1_rms_norm"."""
    rms = "rms" in kind.lower()
    module = kind[0] == "L"
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    shape = draw(shapes(1, 3, min_side=0))
    dims = 1 if rms else draw(st.integers(1, len(shape)))
    norm_shape = shape[len(shape) - dims :]
    x, layout = draw(layouts(draw(values(shape, dtype))))
    bits = draw(st.sampled_from((None, None, 8, 4)))
    eps_ = draw(st.sampled_from((1e-5, 1e-6, 0.1, 1e-12)))
    affine = rms or draw(st.booleans())
    params = {}
    if affine:
        params["weight"] = draw(values(norm_shape, torch.float32, False)) + 1
        if not rms:
            params["bias"] = draw(values(norm_shape, torch.float32, False))
    prefixes = ("L1RMSNorm", "l1_rms_norm") if rms else ("L1LayerNorm", "l1_layer_norm")
    options = [("x", v) for v in _bad_tensors(x)]
    options += [("eps", v) for v in _BAD_EPS]
    options += [("bits", v) for v in _BAD_BITS if v is not None]
    wrong = tuple(s + 1 for s in norm_shape)
    options += [("weight", torch.ones(wrong)), ("weight", torch.ones(norm_shape, device=META))]
    if module:
        options += [("normalized_shape", v) for v in (-1, (2.5,), None, "4")]
    else:
        options += [("normalized_shape", wrong)] if not rms else []
    bad = draw(invalid_choice(options))
    invalid, errors = None, (ValueError, TypeError)
    if bad is not None:
        invalid = (bad[0],)
        if bad[0] == "normalized_shape":
            invalid = ("normalized_shape", "x")
        if bad[0] == "weight" and bad[1].device == META:
            errors = (ValueError, TypeError, NotImplementedError)

    def call():
        kw = {"eps": eps_, "bits": bits}
        x_, p = x, dict(params)
        shape_arg = norm_shape
        if bad is not None:
            if bad[0] == "x":
                x_ = bad[1]
            elif bad[0] == "weight":
                p["weight"] = bad[1]
            elif bad[0] == "normalized_shape":
                shape_arg = bad[1]
            else:
                kw[bad[0]] = bad[1]
        if module:
            cls = fg.nn.L1RMSNorm if rms else fg.nn.L1LayerNorm
            ctor = {} if rms else {"elementwise_affine": affine}
            layer = cls(shape_arg, **kw, **ctor)
            with torch.no_grad():
                for name, t in p.items():
                    have = getattr(layer, name)
                    if have is not None and have.shape == t.shape and t.device.type == "cpu":
                        have.copy_(t)
                    else:
                        setattr(layer, name, torch.nn.Parameter(t, requires_grad=False))
            return layer(x_)
        from ferrograd.ops.l1norm import l1_layer_norm, l1_rms_norm

        if rms:
            return l1_rms_norm(x_, p.get("weight"), **kw)
        return l1_layer_norm(x_, shape_arg, p.get("weight"), p.get("bias"), **kw)

    def check(y):
        assert y.dtype == dtype, f"dtype {y.dtype} != {dtype}"
        xin = x
        if bits is not None and x.numel():
            # The codes path normalizes the dequantized codes of x (nearest, groups of 64).
            n = math.prod(norm_shape)
            xin = fg.shiftquant(x.reshape(-1, n), bits, 64).dequantize().reshape(x.shape)
        if rms:
            want, tol = ref.l1_rms_norm(xin, params.get("weight"), eps_, dtype, bits is not None)
        else:
            w_, b_ = params.get("weight"), params.get("bias")
            want, tol = ref.l1_layer_norm(xin, dims, w_, b_, eps_, dtype, bits is not None)
        assert_close(y, want, tol.nan_to_num(0.0, 0.0, 0.0), kind)

    return Case(
        call,
        [x, params],
        prefixes,
        check,
        invalid,
        errors,
        desc={
            "layout": layout,
            "normalized_shape": norm_shape,
            "bits": bits,
            "eps": eps_,
            "affine": affine,
            "x": describe(x),
            "bad": repr(bad)[:120],
        },  # fmt: skip
    )


# ---- W4 ---------------------------------------------------------------------------------------

_W4_GROUPS = (-1, 1, 7, 32, 64, 128, 256)


@st.composite
def quantize_w4_case(draw) -> Case:
    op = "quantize_w4"
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    n = draw(st.integers(1, 9))
    k = draw(st.integers(1, 200)) if not rare(draw, 8) else draw(st.sampled_from((1000, 4097)))
    scales = (1.0, 1e-3, 1e3, 1e-8, 1e6, 1e-30, 1e30)
    w, layout = draw(layouts(draw(values((n, k), dtype, scales=scales))))
    group_size = draw(st.sampled_from(_W4_GROUPS))
    if draw(st.booleans()):
        group_size = np.int64(group_size)
    zero_point = draw(st.booleans())
    args = {"weight": w, "group_size": group_size, "zero_point": zero_point}
    bad = draw(
        invalid_choice(
            [("weight", v) for v in _bad_tensors(w)]
            + [("weight", v) for v in (w[0], w[None], w[:, :0])]
            + [("group_size", v) for v in (0, -2, 2**63, 2**64, 1.5, None, True, "128")]
            + [("zero_point", v) for v in (None, 1, "yes")]
        )
    )
    invalid = None
    if bad is not None:
        args[bad[0]] = bad[1]
        invalid = (bad[0],)
    elif not bool(w.isfinite().all()):
        invalid = ("weight",)
    elif zero_point:
        rule = ref.w4_scales(w, int(group_size), True) * 15
        if bool((rule > torch.finfo(torch.float32).max).any()):
            invalid = ("weight",)  # a range that overflows float32: refused (docs)

    def check(q):
        assert isinstance(q, fg.quant.W4Weight), type(q).__name__
        assert tuple(q.shape) == (n, k) and q.dtype == dtype, f"{q.shape} {q.dtype}"
        want_s = ref.w4_scales(w, int(group_size), zero_point)
        want_f32 = want_s.float()
        narrow = torch.bfloat16 if dtype == torch.bfloat16 else torch.float16
        fi = torch.finfo(narrow)
        fits = bool(((want_f32.abs() >= fi.tiny) & (want_f32.abs() <= fi.max)).all())
        assert q.scales.dtype == (narrow if fits else torch.float32), (
            f"scales stored as {q.scales.dtype}, every scale fits {narrow}: {fits}"
        )
        got_s = q.scales.double()
        spacing = torch.finfo(q.scales.dtype).tiny * eps(q.scales.dtype)  # subnormal scales
        assert_close(q.scales, want_s, 2 * eps(q.scales.dtype) * want_s + spacing, f"{op} scales")
        codes = q.codes.long()
        lo, hi = (0, 15) if zero_point else (-8, 7)
        assert int(codes.min()) >= lo and int(codes.max()) <= hi, "codes out of range"
        w_hat = q.dequantize()
        assert w_hat.dtype == dtype and tuple(w_hat.shape) == (n, k), "dequantize() shape/dtype"
        g = k if int(group_size) == -1 else int(group_size)
        s_true = want_s.repeat_interleave(g, -1)[:, :k]
        s_got = got_s.repeat_interleave(g, -1)[:, :k]
        # One step of the rule's scale (round to nearest, and the clamp at the range's ends),
        # what storing the scale moves 16 codes by, and w_hat's rounding to the weight's dtype.
        tol = s_true + 16 * (s_got - s_true).abs() + 2 * eps(dtype) * w.double().abs()
        assert_close(w_hat, w.double(), tol, f"{op} dequantize")

    return Case(
        lambda: fg.quant.quantize_w4(**args),
        [w],
        (op,),
        check,
        invalid,
        desc={"layout": layout, **_describe_args(args)},
    )


@st.composite
def w4a16_matmul_case(draw) -> Case:
    op = "w4a16_matmul"
    n = draw(st.integers(1, 12))
    k = draw(st.integers(1, 160)) if not rare(draw, 8) else draw(st.sampled_from((1000, 4097)))
    group_size = draw(st.sampled_from(_W4_GROUPS))
    zero_point = draw(st.booleans())
    wdtype = draw(st.sampled_from((torch.float32, torch.bfloat16)))
    weight = draw(values((n, k), wdtype, False))
    w = fg.quant.quantize_w4(weight, group_size, zero_point)
    dtype = draw(st.sampled_from((*KERNEL_DTYPES, torch.float32, torch.float64)))
    lead = draw(shapes(0, 3, max_side=5, max_numel=64))
    x, layout = draw(layouts(draw(values((*lead, k), dtype, scales=(1.0, 1e-3, 1e3, 1e38)))))
    bias = draw(values((n,), dtype, False)) if draw(st.booleans()) else None
    args = {"x": x, "w": w, "bias": bias}
    bad = draw(
        invalid_choice(
            [("x", v) for v in _bad_tensors(x)]
            + [("x", torch.zeros(*lead, k + 1, dtype=dtype)), ("x", x.new_zeros(()))]
            + [("w", v) for v in (weight, None, w.packed)]
            + [("bias", v) for v in (torch.zeros(n + 1, dtype=dtype), torch.zeros(n, device=META))]
        )
    )
    invalid = None
    if bad is not None:
        args[bad[0]] = bad[1]
        invalid = (bad[0], "K") if bad[0] == "x" else (bad[0],)

    def check(y):
        assert y.dtype == dtype, f"dtype {y.dtype} != {dtype}"
        # (q - zero) * scale exactly, rounded to x's dtype as the kernels take it.
        w_hat = ref.w4_dequantized(w).to(dtype).double()
        xd = x.double()
        want = xd @ w_hat.T
        if bias is not None:
            want = want + bias.double()
        xa = xd.abs().nan_to_num(0.0, 0.0, 0.0)
        size = xa @ w_hat.abs().T
        tol = 8 * eps(dtype) * size + 2 * eps(dtype) * want.abs().nan_to_num(0.0, 0.0, 0.0)
        # Sums of K products in float32 (float64 for float64 x), as torch's matmul adds them on
        # the dequantizing path: the textbook K u bound.
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        tol = tol + k * eps(acc) * size
        # The integer GEMV rounds x to 16-bit integers per row, a step of max|x_row| / 32639
        # (ops/w4a16/cpu.py): half a step times the row of |W_hat| it meets.
        step = xa.amax(-1, keepdim=True) / 32639 if k else xa.sum(-1, keepdim=True)
        tol = tol + step / 2 * w_hat.abs().sum(-1)
        # (and the output's subnormal spacing)
        tol = tol + (0 if bias is None else 2 * eps(dtype) * bias.double().abs())
        tol = tol + torch.finfo(dtype).tiny * eps(dtype)
        inf_rows = x.isinf().any(-1, keepdim=True) & ~x.isnan().any(-1, keepdim=True)
        if bool(inf_rows.any()):
            # inf in x: every non-finite exact entry must be non-finite (inf or NaN), as in torch.
            exact_bad = ~want.isfinite() & inf_rows
            assert bool((~y.double().isfinite())[exact_bad].all()), f"{op}: lost an inf"
            y = torch.where(inf_rows, 0.0, y.double()).to(y.dtype)
            want = torch.where(inf_rows, 0.0, want)
        # The float kernels take W_hat unrounded (float32): where that product is past the
        # output's range, inf of its sign is right even if the rounded W_hat's is finite (terms
        # of 1e41 cancelling to 1e38 differ by more than the range between the two).
        exact = xd @ ref.w4_dequantized(w).T
        if bias is not None:
            exact = exact + bias.double()
        past = (exact.abs() > torch.finfo(dtype).max) & (y.double() == exact.sign() * math.inf)
        if bool(past.any()):
            y = torch.where(past, 0.0, y.double()).to(y.dtype)
            want = torch.where(past, 0.0, want)
        assert_close(y, want, tol, op)

    return Case(
        lambda: fg.w4a16_matmul(**args),
        [x, w, bias],
        (op,),
        check,
        invalid,
        (ValueError, TypeError, NotImplementedError)
        if bad and bad[0] == "bias"
        else (ValueError, TypeError),
        desc={"layout": layout, "w": repr(w), **_describe_args(args)},
    )


@st.composite
def w4_dequantize_case(draw) -> Case:
    """W4Weight.dequantize of a weight of any stored layout, or building one from bad fields."""
    op = "W4Weight"
    n, k = draw(st.integers(1, 9)), draw(st.integers(1, 200))
    group_size = draw(st.sampled_from(_W4_GROUPS))
    zero_point = draw(st.booleans())
    weight = draw(values((n, k), torch.float32, False))
    w = fg.quant.quantize_w4(weight, group_size, zero_point)
    layout = draw(st.sampled_from(("cpu_blocks", "gpu_words")))
    w = w.with_layout(layout)
    fields = {f: getattr(w, f) for f in ("packed", "scales", "zeros", "shape", "group_size")}
    fields.update(dtype=w.dtype, layout=w.layout)
    packed_t = w.packed.t().contiguous().t() if w.packed.shape[1] > 1 else w.packed
    bad = draw(
        invalid_choice(
            [("packed", v) for v in (w.packed.numpy(), w.packed.to(torch.int16), w.packed[:, :-1])]
            + [("scales", v) for v in (w.scales.double(), w.scales[:, :0], w.scales.numpy())]
            + [("zeros", v) for v in (w.scales, torch.zeros(n, 1000, dtype=torch.uint8))]
            + [("shape", v) for v in ((n,), (n, -k), (n, 1.5), None)]
            + [("group_size", v) for v in (0, -3, 1.5, None)]
            + [("dtype", v) for v in (torch.int8, "float32")]
            + [("layout", v) for v in ("rows", None)],
            one_in=2,
        )
    )
    if bad is not None:
        kw = {**fields, bad[0]: bad[1]}
        return Case(
            lambda: fg.quant.W4Weight(**kw).dequantize(),
            [w],
            (op,),
            invalid=(bad[0],),
            desc={"w": repr(w), "bad": f"{bad[0]}={describe(bad[1])}"},
        )
    # A packed tensor of other strides (column-major) holds the same codes (defect 7).
    use = fg.quant.W4Weight(**{**fields, "packed": packed_t}) if draw(st.booleans()) else w

    def check(got):
        want = ref.w4_dequantized(w).to(w.dtype).double()
        assert_close(got, want, 0.0, "W4Weight.dequantize")
        assert_close(w.with_layout("cpu_blocks").dequantize(), want, 0.0, "cpu_blocks")

    return Case(use.dequantize, [w, use], (op,), check, desc={"w": repr(w)})


@st.composite
def w4a16_linear_case(draw) -> Case:
    """W4A16Linear.from_linear (SmoothQuant+'s smooth folded in) and its forward."""
    op = "W4A16Linear"
    in_f, out_f = draw(st.integers(1, 80)), draw(st.integers(1, 10))
    torch.manual_seed(draw(st.integers(0, 2**31 - 1)))
    linear = torch.nn.Linear(in_f, out_f, bias=draw(st.booleans()))
    group_size = draw(st.sampled_from(_W4_GROUPS))
    smooth = draw(st.sampled_from((None, "rand")))
    if smooth == "rand":
        smooth = torch.rand(in_f) + 0.25
    x = draw(values((draw(st.integers(0, 4)), in_f), torch.float32, False))
    args = {"linear": linear, "group_size": group_size, "smooth": smooth}
    bad = draw(
        invalid_choice(
            [("linear", v) for v in (None, torch.nn.Conv1d(2, 2, 1), linear.weight)]
            + [("group_size", v) for v in (0, -2, 1.5, None)]
            + [("smooth", v) for v in (torch.zeros(in_f), -torch.ones(in_f), torch.ones(in_f + 1))]
            + [("smooth", v) for v in (torch.full((in_f,), math.nan), [1.0] * in_f)]
        )
    )
    if bad is not None:
        args[bad[0]] = bad[1]

    def call():
        layer = fg.nn.W4A16Linear.from_linear(**args)
        return layer, layer(x)

    def check(result):
        layer, y = result
        s = torch.ones(in_f, dtype=torch.float64) if smooth is None else smooth.double()
        w = linear.weight.detach().double() * s
        w_hat = ref.w4_dequantized(layer.weight)
        scales = layer.weight.scales.double()
        g = in_f if group_size == -1 else group_size
        step = scales.repeat_interleave(g, -1)[:, :in_f]
        # Round to nearest per group (a step of the stored scale, and its 16-bit rounding).
        assert_close(w_hat.float(), w, step * (1 + 16 * eps(scales.dtype)) + 1e-30, op)
        want = (x.double() / s) @ w_hat.T
        if linear.bias is not None:
            want = want + linear.bias.detach().double()
        xa = (x.double() / s).abs()
        tol = 8 * eps(torch.float32) * (xa @ w_hat.abs().T) + 1e-30
        tol = tol + xa.amax(-1, keepdim=True) / 32639 / 2 * w_hat.abs().sum(-1)
        assert_close(y, want, tol + 2 * eps(torch.float32) * want.abs(), f"{op} forward")

    return Case(
        call,
        [linear, smooth, x],
        (f"{op}.from_linear", op, "quantize_w4"),
        check,
        None if bad is None else (bad[0],),
        desc={
            "in": in_f,
            "out": out_f,
            "group_size": group_size,
            "smooth": describe(smooth),
            "bad": None if bad is None else f"{bad[0]}={describe(bad[1])}",
        },  # fmt: skip
    )


class _Shared(torch.nn.Module):
    """A Linear used twice (tied) and a LayerNorm between."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.a = torch.nn.Linear(n, n)
        self.norm = torch.nn.LayerNorm(n)
        self.b = self.a

    def forward(self, x):
        return self.b(self.norm(self.a(x)))


@st.composite
def quantize_model_case(draw) -> Case:
    op = "quantize_model"
    n = draw(st.sampled_from((8, 64, 70)))
    torch.manual_seed(draw(st.integers(0, 2**31 - 1)))
    kind = draw(st.sampled_from(("sequential", "shared", "linear", "norm")))
    model = {
        "sequential": lambda: torch.nn.Sequential(torch.nn.Linear(n, n), torch.nn.ReLU()),
        "shared": lambda: _Shared(n),
        "linear": lambda: torch.nn.Linear(n, n),
        "norm": lambda: torch.nn.LayerNorm(n),
    }[kind]()
    kw = {
        "bits": draw(st.integers(2, 8)),
        "grad_bits": draw(st.sampled_from((None, 4, 8))),
        "group_size": draw(st.sampled_from(_GROUP_SIZES)),
        "norms": draw(st.booleans()),
    }
    args = {"model": model, **kw}
    bad = draw(
        invalid_choice(
            [("model", v) for v in (None, 3, [torch.nn.Linear(2, 2)])]
            + [("bits", v) for v in _BAD_BITS]
            + [("grad_bits", v) for v in (1, 9, 4.0)]
            + [("group_size", v) for v in _BAD_GROUPS]
            + [("norms", v) for v in (None, 1)]
        )
    )
    if bad is not None:
        args[bad[0]] = bad[1]
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    x = torch.randn(3, n)

    def check(out):
        mods = list(out.modules())
        assert not any(type(m) is torch.nn.Linear for m in mods), "an nn.Linear was left"
        if kw["norms"]:
            assert not any(type(m) is torch.nn.LayerNorm for m in mods), "a LayerNorm was left"
        if kind == "shared":
            assert out.a is out.b, "the tied Linear was untied"
        for m in mods:
            if isinstance(m, fg.nn.ShiftQuantLinear):
                assert (m.bits, m.grad_bits, m.group_size) == (
                    kw["bits"], kw["grad_bits"], kw["group_size"]), "options"  # fmt: skip
        after = out.state_dict()
        for k, v in before.items():
            assert torch.equal(after[k], v), f"{k} changed"
        assert out(x).shape == (3, n)

    return Case(
        lambda: fg.nn.quantize_model(**args),
        [x],
        (op,),
        check,
        None if bad is None else (bad[0],),
        desc={"kind": kind, **{k: repr(v) for k, v in kw.items()}, "bad": repr(bad)[:80]},
    )


# ---- optimizers -------------------------------------------------------------------------------


def _grads(gen, shapes_, steps, specials):
    out = []
    for t in range(steps):
        gs = [torch.randn(s, generator=gen) * 0.1 for s in shapes_]
        if specials and t == steps - 1:
            for g in gs:
                if g.numel():
                    g.view(-1)[0] = math.nan
        out.append(gs)
    return out


@st.composite
def optimizer_case(draw, stable: bool) -> Case:
    from test_spam import ReferenceSPAM, reference_stable_spam

    op = "StableSPAM" if stable else "SPAM"
    cls = fg.optim.StableSPAM if stable else fg.optim.SPAM
    shapes_ = [
        draw(shapes(0, 3, max_side=6, max_numel=2048)) for _ in range(draw(st.integers(1, 3)))
    ]
    steps = draw(st.integers(1, 8))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes_]
    grads = _grads(gen, shapes_, steps, rare(draw, 8))
    kw = {
        "lr": draw(st.sampled_from((1e-3, 1e-2, 0.1, 0.0))),
        "betas": draw(st.sampled_from(((0.9, 0.999), (0.5, 0.9), (0.0, 0.0)))),
        "eps": draw(st.sampled_from((1e-6, 1e-8, 1e-3))),
        "weight_decay": draw(st.sampled_from((0.0, 0.01, 0.5))),
        "reset_interval": draw(st.integers(1, 6)),
        "density": draw(st.sampled_from((1.0, 1.0, 0.5, 0.0))),
        "seed": draw(st.integers(0, 2**64 - 1)),
    }
    if stable:
        kw.update(
            gamma1=draw(st.sampled_from((0.7, 0.0, 0.9))),
            gamma2=draw(st.sampled_from((0.9, 0.5))),
            gamma3=draw(st.sampled_from((0.999, 0.9))),
            total_steps=draw(st.sampled_from((None, 1, 5, 100))),
            eta_min=draw(st.sampled_from((0.5, 0.0, 1.0))),
        )
        extra = [("gamma1", v) for v in (1.0, -0.1, math.nan, "0.7")]
        extra += [("total_steps", v) for v in (0, -1, 1.5, "5")]
        extra += [("eta_min", v) for v in (-0.1, 1.5, math.nan)]
    else:
        kw.update(
            warmup_steps=draw(st.integers(1, 4)),  # 0 (no warmup): test_spam.py
            threshold=draw(st.sampled_from((5000.0, 1.0, 0.5))),
            clip_warmup=draw(st.integers(0, 3)),
        )
        extra = [("warmup_steps", v) for v in (-1, None, 1.5)]
        extra += [("threshold", v) for v in (-1.0, 0.0, math.nan, None)]  # inf: no clipping
        extra += [("clip_warmup", v) for v in (-1, 2.5, None)]
    bad = draw(
        invalid_choice(
            [("lr", v) for v in (-1e-3, *BAD_FLOATS)]
            + [("eps", v) for v in (0.0, -1.0, 1e-50, math.nan)]
            + [("betas", v) for v in ((1.0, 0.9), (0.9,), (-0.1, 0.9), "ab", None, (0.9, math.nan))]
            + [("weight_decay", v) for v in (-0.1, math.nan, math.inf)]
            + [("density", v) for v in (1.5, -0.1, math.nan)]
            + [("reset_interval", v) for v in (0, -1, 1.5, None, True)]
            + [("seed", v) for v in (-1, 2**64, 1.5, None)]
            + extra
        )
    )
    if bad is not None:
        bad_kw = {**kw, bad[0]: bad[1]}
        names = ("betas", "betas[0]", "betas[1]") if bad[0] == "betas" else (bad[0],)
        return Case(
            lambda: cls(params, **bad_kw),
            [params],
            (op,),
            invalid=names,
            desc={"bad": f"{bad[0]}={bad[1]!r}", "kw": repr(kw)},
        )
    opt_params = [p.detach().clone().requires_grad_() for p in params]

    def call():
        opt = cls(opt_params, **kw)
        active = []
        for gs in grads:
            for p, g in zip(opt_params, gs, strict=True):
                p.grad = g
            opt.step()
            active.append([opt.active_indices(p) for p in opt_params])
        return opt, active

    def check(result):
        opt, active = result
        for p in opt_params:
            assert opt.active_indices(p).numel() == (
                round(kw["density"] * p.numel())
                if p.dim() >= 2 and kw["density"] < 1
                else p.numel()
            ), "active_indices count"
        hp = (kw["lr"], kw["betas"], kw["eps"], kw["weight_decay"])
        if stable:
            if kw["density"] < 1 or any(
                g.abs().max() == 0 for gs in grads for g in gs if g.numel()
            ):
                return  # the reference is dense, and divides by the gradient norm
            if any(p.numel() == 0 for p in params):
                return
            total = kw["total_steps"] or 10**12
            want = reference_stable_spam(
                params, grads, *hp, kw["gamma1"], kw["gamma2"], kw["gamma3"],
                kw["reset_interval"], total, kw["eta_min"],
            )  # fmt: skip
        else:
            r = ReferenceSPAM(params, *hp, kw["reset_interval"], kw["warmup_steps"],
                              kw["threshold"], kw["clip_warmup"])  # fmt: skip
            sparse = kw["density"] < 1
            for gs, act in zip(grads, active, strict=True):
                mask = [
                    a if sparse and p.dim() >= 2 else None for a, p in zip(act, params, strict=True)
                ]
                r.step(gs, mask if sparse else None)
            want = r.params
        nan_grads = any(bool(g.isnan().any()) for gs in grads for g in gs)
        for i, (p, w) in enumerate(zip(opt_params, want, strict=True)):
            if stable and nan_grads and bool(w.isnan().any()):
                # The rule's max|g| and norm make a NaN gradient NaN the whole tensor; a NaN
                # confined to its own entries (as torch's Adam gives) is accepted.
                assert bool(p.isnan().any()), f"{op} param {i}: a NaN gradient was dropped"
                continue
            tol = 1e-5 * (w.double().abs() + kw["lr"] * steps) + 1e-7
            assert_close(p.detach(), w.double(), tol, f"{op} param {i}")

    # The gradients the optimizer reads must come back unchanged.
    return Case(
        call, [grads], (op,), check, desc={"shapes": shapes_, "steps": steps, "kw": repr(kw)}
    )


# ---- data -------------------------------------------------------------------------------------


@st.composite
def documents(draw, max_docs=6):
    count = draw(st.integers(0, max_docs))
    docs = []
    for _ in range(count):
        length = draw(st.integers(0, 20)) if not rare(draw, 10) else draw(st.integers(100, 400))
        raw = bytes(
            draw(st.lists(st.integers(0, 255), min_size=min(length, 8), max_size=min(length, 8)))
        )
        doc = (raw * (length // max(len(raw), 1) + 1))[:length] if raw else b""
        docs.append(doc.decode("latin-1") if draw(st.booleans()) and doc.isascii() else doc)
    return docs


def _as_bytes(doc) -> bytes:
    return doc.encode("utf-8", "surrogatepass") if isinstance(doc, str) else bytes(doc)


def _pieces(batch, split_long: bool) -> list:
    """(tokens, targets) of every piece in a packed batch, and checks of the per-row fields."""
    ids, tg, pos, doc = (t.tolist() for t in (batch.input_ids, batch.targets,
                                               batch.position_ids, batch.document_ids))  # fmt: skip
    out, segments = [], []
    for r in range(len(ids)):
        row_pieces: dict[int, list[int]] = {}
        for i, d in enumerate(doc[r]):
            row_pieces.setdefault(d, []).append(i)
        order = [d for d in row_pieces if d >= 0]
        assert order == list(range(len(order))), f"row {r}: document_ids {doc[r]}"
        for d in order:
            cols = row_pieces[d]
            assert cols == list(range(cols[0], cols[0] + len(cols))), f"row {r}: piece {d} split"
            assert [pos[r][i] for i in cols] == list(range(len(cols))), f"row {r}: position_ids"
            toks, targets = tuple(ids[r][i] for i in cols), tuple(tg[r][i] for i in cols)
            out.append((toks, targets if split_long else targets[:-1]))
            segments.append(len(cols))
        pad = row_pieces.get(-1, [])
        if pad:
            assert all(ids[r][i] == 0 and tg[r][i] == -100 for i in pad), f"row {r}: padding"
            assert pad == list(range(len(ids[r]) - len(pad), len(ids[r]))), f"row {r}: padding"
            segments.append(len(pad))
    cu = [0]
    for s in segments:
        cu.append(cu[-1] + s)
    assert batch.cu_seqlens.dtype == torch.int32 and batch.cu_seqlens.tolist() == cu, "cu_seqlens"
    assert batch.max_seqlen == max(segments, default=0), "max_seqlen"
    return out


@st.composite
def pack_documents_case(draw) -> Case:
    op = "pack_documents"
    docs = draw(documents())
    kw = {
        "seq_len": draw(st.integers(1, 24)),
        "batch_size": draw(st.sampled_from((None, None, 1, 2, 4, 8))),
        "offset": draw(st.sampled_from((4, 3, 10, 2**20))),
        "add_bos": draw(st.booleans()),
        "add_eos": draw(st.booleans()),
        "split_long": draw(st.booleans()),
        "seed": draw(st.sampled_from((None, 0, 5, 2**63))),
    }
    args = {"docs": docs, **kw}
    bad = draw(
        invalid_choice(
            [("docs", v) for v in (None, "abc", b"abc", 3, [b"a", 3], [None], [["a"]])]
            + [("seq_len", v) for v in BAD_INTS if v != 2**64]
            + [("batch_size", v) for v in (0, -1, 1.5, "2", True)]
            + [("offset", v) for v in (2, -1, 1.5, None, 2**64)]
            + [("seed", v) for v in (-1, 1.5, "0", 2**64)]
            + [(k, v) for k in ("add_bos", "add_eos", "split_long") for v in (None, 1, "yes")]
        )
    )
    invalid = None
    if bad is not None:
        args[bad[0]] = bad[1]
        invalid = (bad[0],)
    want = ref.expected_pieces(
        [_as_bytes(d) for d in docs], kw["seq_len"], kw["offset"], kw["add_bos"], kw["add_eos"],
        kw["split_long"],
    )  # fmt: skip
    if not kw["split_long"]:
        want = [(t, g[:-1]) for t, g in want]
    if invalid is None and kw["batch_size"] is not None:
        if ref.best_fit_rows([len(t) for t, _ in want], kw["seq_len"]) > kw["batch_size"]:
            invalid = ("batch_size",)

    def check(batch):
        assert isinstance(batch, fg.data.PackedBatch), type(batch).__name__
        rows = batch.input_ids.shape[0]
        for name in ("input_ids", "targets", "position_ids", "document_ids"):
            t = getattr(batch, name)
            assert t.dtype == torch.int64 and tuple(t.shape) == (rows, kw["seq_len"]), name
        if kw["batch_size"] is not None:
            assert rows == kw["batch_size"], f"{rows} rows, batch_size {kw['batch_size']}"
        got = _pieces(batch, kw["split_long"])
        assert sorted(got) == sorted(want), (
            f"pieces differ: {sorted(got)[:3]} vs {sorted(want)[:3]}"
        )

    return Case(
        lambda: fg.data.pack_documents(**args),
        [docs],
        (op,),
        check,
        invalid,
        desc={
            "docs": repr(docs)[:300],
            **{k: repr(v) for k, v in kw.items()},
            "bad": repr(bad)[:80],
        },
    )


@st.composite
def decode_bytes_case(draw) -> Case:
    op = "decode_bytes"
    offset = draw(st.sampled_from((4, 0, 3, 100)))
    n = draw(st.integers(0, 30))
    ids = draw(st.lists(st.sampled_from((-100, 0, 1, 2, 3, offset, offset + 255))
                        | st.integers(-100, offset + 255), min_size=n, max_size=n))  # fmt: skip
    form = draw(st.sampled_from(("list", "tuple", "tensor", "tensor2d", "numpy")))
    if form == "tensor2d" and n % 2 == 0 and n:
        arg = torch.tensor(ids).view(2, -1).t()  # a transposed view: row-major order differs
        ids = arg.reshape(-1).tolist()
    elif form.startswith("tensor"):
        dtype = draw(st.sampled_from(INT_DTYPES))
        info = torch.iinfo(dtype)
        ids = [i for i in ids if info.min <= i <= info.max]
        arg = torch.tensor(ids, dtype=dtype)
    elif form == "numpy":
        arg = np.array(ids, dtype=np.int64)
    else:
        arg = ids if form == "list" else tuple(ids)
    args = {"ids": arg, "offset": offset}
    bad = draw(
        invalid_choice(
            [("ids", v) for v in (None, "abc", b"abc", [1.5], [101.7], torch.tensor([4.0]))]
            + [("ids", v) for v in (torch.tensor([True]), [offset + 256], [2**70], [[1], [2, 3]])]
            + [("offset", v) for v in (-1, 1.5, None, True, "4")]
        )
    )
    invalid = None
    if bad is not None:
        args[bad[0]] = bad[1]
        invalid = ("ids", "id") if bad[0] == "ids" else ("offset",)

    def check(text):
        want = ref.decode_bytes(ids, offset)
        assert text == want, f"{text!r} != {want!r}"

    return Case(
        lambda: fg.data.decode_bytes(**args),
        [arg],
        (op,),
        check,
        invalid,
        desc={"ids": describe(arg), "offset": offset, "bad": repr(bad)[:80]},
    )


@st.composite
def document_mask_case(draw) -> Case:
    op = "document_mask"
    shape = draw(shapes(1, 3, max_side=9, max_numel=512))
    dtype = draw(st.sampled_from((torch.int64, torch.int32, torch.int8)))
    ids = torch.randint(
        -1, 4, shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 999)))
    )
    ids, layout = draw(layouts(ids.to(dtype)))
    bad = draw(invalid_choice([None, ids.double(), ids.bool(), ids.new_zeros(()), [0, 1]]))
    arg = ids if bad is None else bad

    def check(mask):
        want = ref.document_mask(ids.long())
        assert mask.dtype == torch.bool and torch.equal(mask, want), "mask differs"

    return Case(
        lambda: fg.data.document_mask(arg),
        [arg],
        (op,),
        check,
        None if bad is None else ("document_ids",),
        desc={"ids": describe(arg), "layout": layout},
    )


def _through_torch_save(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _batch_tuple(b) -> tuple:
    return tuple(t.tolist() for t in (b.input_ids, b.targets, b.position_ids, b.document_ids))


@st.composite
def bytestream_case(draw) -> Case:
    op = "ByteStream"
    docs = [_as_bytes(d) for d in draw(documents(5))]
    kw = {
        "seq_len": draw(st.integers(1, 12)),
        "batch_size": draw(st.integers(1, 3)),
        "shuffle": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**64)),
        "add_bos": draw(st.booleans()),
        "add_eos": draw(st.booleans()),
        "offset": draw(st.sampled_from((4, 3, 20))),
    }
    bad = draw(
        invalid_choice(
            [("sources", v) for v in (None, 3, 1.5)]
            + [("seq_len", v) for v in (0, -1, 1.5, None, True)]
            + [("batch_size", v) for v in (0, 2.0, "1")]
            + [("seed", v) for v in (-1, 1.5, None)]
            + [(k, v) for k in ("shuffle", "add_bos", "add_eos") for v in (None, 1)]
            + [("offset", v) for v in (2, -1, 1.5)]
        )
    )
    if bad is not None:
        bad_kw = {"sources": docs, **kw, bad[0]: bad[1]}
        return Case(
            lambda: list(fg.data.ByteStream(**bad_kw)),
            [docs],
            (op,),
            invalid=(bad[0],),
            desc={"bad": f"{bad[0]}={bad[1]!r}", "kw": repr(kw)},
        )
    save_at = draw(st.integers(0, 64))

    def call():
        full = [_batch_tuple(b) for b in fg.data.ByteStream(docs, **kw)]
        s1 = fg.data.ByteStream(docs, **kw)
        it = iter(s1)
        k = min(save_at, len(full))
        head = [_batch_tuple(next(it)) for _ in range(k)]
        s2 = fg.data.ByteStream(docs, **kw)
        s2.load_state_dict(_through_torch_save(s1.state_dict()))
        return full, head, k, [_batch_tuple(b) for b in s2]

    def check(result):
        full, head, k, tail = result
        assert head == full[:k], "the same stream twice differs"
        assert tail == full[k:], f"resume after batch {k} of {len(full)} differs"
        seq, bs, off = kw["seq_len"], kw["batch_size"], kw["offset"]
        toks = [t for b in full for row in b[0] for t in row]
        assert all(len(b[0]) == bs and all(len(r) == seq for r in b[0]) for b in full), "shape"
        want = sorted(x + off for d in docs for x in d)
        assert sorted(t for t in toks if t >= off) == want, "the bytes differ"
        for special, on in ((1, kw["add_bos"]), (2, kw["add_eos"])):
            assert toks.count(special) == (len(docs) if on else 0), f"count of id {special}"
        for ids, targets, _, doc_ids in full:
            for r in range(bs):
                for i in range(seq - 1):
                    if doc_ids[r][i] >= 0 and doc_ids[r][i + 1] == doc_ids[r][i]:
                        assert targets[r][i] == ids[r][i + 1], "a target is not the next id"

    return Case(call, [docs], (op,), check, desc={"docs": repr(docs)[:300], "kw": repr(kw),
                                                  "save_at": save_at})  # fmt: skip


CASES = {
    "softmax": softmax_case(),
    "log_softmax": softmax_case(log=True),
    "linear_cross_entropy": cce_case(),
    "shiftquant": shiftquant_case(),
    "ShiftQuantTensor.dequantize": dequantize_case(),
    "shiftquant_matmul": shiftquant_matmul_case(),
    "ShiftQuantLinear": shiftquant_linear_case(),
    "L1LayerNorm": l1norm_case("L1LayerNorm"),
    "L1RMSNorm": l1norm_case("L1RMSNorm"),
    "l1_layer_norm": l1norm_case("l1_layer_norm"),
    "l1_rms_norm": l1norm_case("l1_rms_norm"),
    "quantize_w4": quantize_w4_case(),
    "W4Weight.dequantize": w4_dequantize_case(),
    "w4a16_matmul": w4a16_matmul_case(),
    "W4A16Linear": w4a16_linear_case(),
    "quantize_model": quantize_model_case(),
    "SPAM": optimizer_case(stable=False),
    "StableSPAM": optimizer_case(stable=True),
    "pack_documents": pack_documents_case(),
    "decode_bytes": decode_bytes_case(),
    "document_mask": document_mask_case(),
    "ByteStream": bytestream_case(),
}
