"""float64 (or plain torch) references of the public ops, written from the rules in
docs/definitions.md and the ops' docstrings, never from the code under test, and the
comparison that understands NaN and infinity."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SQRT_HALF_PI = math.sqrt(math.pi / 2)


def eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def assert_close(got, ref: torch.Tensor, tol, what: str) -> None:
    """``got`` equals ``ref`` (float64) within ``tol`` (a number or a tensor like ref): same
    shape, NaN exactly where ref (rounded to got's dtype) is NaN, the same infinities, finite
    entries within tol."""
    assert isinstance(got, torch.Tensor), f"{what}: got {type(got).__name__}, not a tensor"
    assert tuple(got.shape) == tuple(ref.shape), (
        f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    )
    if not got.is_floating_point():
        bad = (got.double() != ref).nonzero()
        assert bad.numel() == 0, f"{what}: differs at {bad[0].tolist()}"
        return
    ref_r = ref.to(got.dtype).double()
    g = got.detach().double().cpu()
    tol = torch.as_tensor(tol, dtype=torch.float64).expand(ref.shape)
    nan_ref, nan_got = ref_r.isnan(), g.isnan()
    if not torch.equal(nan_ref, nan_got):
        i = (nan_ref != nan_got).nonzero()[0].tolist()
        raise AssertionError(
            f"{what}: NaN pattern differs at {i}: got {g[tuple(i)]}, ref {ref[tuple(i)]}"
        )
    inf = ref_r.isinf() & ~nan_ref
    # A reference beyond the dtype's range may come back as inf or as the largest finite value.
    ok_inf = (g == ref_r) | ((g - ref).abs() <= tol)
    if not bool(ok_inf[inf].all()):
        i = (inf & ~ok_inf).nonzero()[0].tolist()
        raise AssertionError(f"{what}: at {i} got {g[tuple(i)]}, ref {ref[tuple(i)]}")
    fin = ~nan_ref & ~inf
    err = torch.where(fin, (g - ref).abs(), 0.0)
    bad = fin & ~(err <= tol)
    if bool(bad.any()):
        i = bad.nonzero()[0].tolist()
        raise AssertionError(
            f"{what}: at {i} got {g[tuple(i)].item()!r}, ref {ref[tuple(i)].item()!r}, "
            f"error {err[tuple(i)].item():.3g} > tol {tol[tuple(i)].item():.3g} "
            f"({int(bad.sum())} of {ref.numel()} entries out)"
        )


# ---- softmax ----------------------------------------------------------------------------------


def softmax(x: torch.Tensor, dim: int, log: bool) -> torch.Tensor:
    x = x.double()
    return torch.log_softmax(x, dim) if log else torch.softmax(x, dim)


def softmax_tol(x: torch.Tensor, ref: torch.Tensor, dim: int, log: bool, out: torch.dtype):
    """softmax: 4e-6 relative in float32 (2e-6 documented, and the output rounding), 2 ulps of
    a 16-bit output; log_softmax: the same relative to the row's largest |x| (the float32
    subtraction x - max - lse is exact to that)."""
    k = 1e-12 if x.dtype == torch.float64 else 4e-6
    rel = max(k, 2 * eps(out))
    tiny = torch.finfo(out).tiny * 2
    if not log:
        return rel * ref.abs() + tiny
    if x.dim() == 0 or x.numel() == 0:
        return rel + tiny
    big = x.double().abs().nan_to_num(0.0, 0.0, 0.0).amax(dim, keepdim=True)
    return rel * (ref.abs().nan_to_num(0.0, 0.0, 0.0) + big + 1)


# ---- ShiftQuant --------------------------------------------------------------------------------


def shiftquant_rule_check(x: torch.Tensor, q, bits: int, group_size: int, stochastic: bool):
    """The rule (docs/definitions.md) on x [..., K] computed in float32: codes in
    [-qmax, qmax], scale R / qmax per row (NaN for a row holding NaN or inf), shift
    floor(log2(R / m)) in 0..15 per group (15 for m = 0), dequantized values within half a step
    (a step, stochastic) of x."""
    shape = x.shape if x.dim() else (1,)
    k_len = shape[-1]
    rows = math.prod(shape[:-1])
    groups = -(-k_len // group_size)
    qmax = 2 ** (bits - 1) - 1
    assert q.codes.dtype == torch.int8 and tuple(q.codes.shape) == tuple(shape), "codes"
    assert q.scale.dtype == torch.float32 and tuple(q.scale.shape) == tuple(shape[:-1]), "scale"
    assert q.shifts.dtype == torch.uint8, "shifts dtype"
    assert tuple(q.shifts.shape) == (*shape[:-1], groups), f"shifts shape {tuple(q.shifts.shape)}"
    if rows == 0 or k_len == 0:
        return
    x2 = x.float().reshape(rows, k_len).double()
    codes = q.codes.reshape(rows, k_len).long()
    scale = q.scale.reshape(rows).double()
    shifts = q.shifts.reshape(rows, groups).long()
    assert int(codes.abs().max()) <= qmax, f"a code beyond qmax={qmax}"
    assert int(shifts.max()) <= 15, "a shift beyond 15"
    special = ~torch.isfinite(x2).all(-1)
    assert bool(scale[special].isnan().all()), "a row with NaN/inf must get scale NaN"
    assert bool((codes[special] == 0).all()), "a row with NaN/inf must get codes 0"
    ok = ~special
    x2, codes, scale, shifts = x2[ok], codes[ok], scale[ok], shifts[ok]
    if x2.shape[0] == 0:
        return
    r = x2.abs().amax(-1)
    want_scale = (r / qmax).float().double()
    assert torch.allclose(scale, want_scale, rtol=2e-7, atol=0), (
        f"scale {scale.tolist()[:4]} != R / qmax {want_scale.tolist()[:4]}"
    )
    padded = F.pad(x2.abs(), (0, groups * group_size - k_len))
    m = padded.view(-1, groups, group_size).amax(-1)
    ratio = r[:, None] / m
    exact = torch.floor(torch.log2(ratio)).clamp(0, 15)
    want_k = torch.where(m == 0, 15.0, exact)
    # log2 in float64 may land on either side of an exact power of two.
    near = (ratio / torch.exp2(torch.round(torch.log2(ratio))) - 1).abs() < 1e-12
    ok_k = (shifts.double() == want_k) | (near & ((shifts.double() - want_k).abs() <= 1))
    assert bool(ok_k.all()), f"shifts {shifts.tolist()[:2]} != rule {want_k.tolist()[:2]}"
    step = (scale[:, None] * torch.exp2(-shifts.double())).repeat_interleave(group_size, -1)
    step = step[:, :k_len]
    deq = codes.double() * step
    assert torch.equal(q.dequantize().reshape(-1, k_len)[ok].double(), deq.float().double()), (
        "dequantize() != codes * scale * 2^-shift"
    )
    # Stochastic rounding: below one step; nearest: half a step (float32 slack), or the clamp.
    bound = step * (1.0 if stochastic else 0.5) * (1 + 1e-5) + 1e-45
    clamped = (x2.abs() / step) > qmax
    err = (deq - x2).abs()
    bad = ~(err <= bound) & ~clamped
    assert not bool(bad.any()), f"dequantized error {err[bad][0].item():.3g} > bound"


def shiftquant_error_bound(x: torch.Tensor, bits: int, stochastic: bool) -> torch.Tensor:
    """A bound on the quantization error of each row's elements (x quantized along its last
    dim): a step is at most max|row| / qmax. Shape [..., 1]."""
    qmax = 2 ** (bits - 1) - 1
    xa = x.detach().double().abs()
    r = xa.amax(-1, keepdim=True) if x.shape[-1] else xa.sum(-1, keepdim=True)
    return r / qmax * (1.0 if stochastic else 0.5) * (1 + 1e-5)


# ---- L1 norms ---------------------------------------------------------------------------------


def l1_layer_norm(x, dims: int, weight, bias, eps_: float, out: torch.dtype, codes: bool):
    """float64 L1 LayerNorm over the trailing ``dims`` dims, and the tolerance the op's
    float32 statistics (always float32 from ``codes``) and its output in ``out`` allow."""
    xd = x.double()
    red = tuple(range(-dims, 0))
    mean = xd.mean(red, keepdim=True)
    d = xd - mean
    r = 1.0 / (SQRT_HALF_PI * d.abs().mean(red, keepdim=True) + eps_)
    y = d * r
    big = xd.abs().amax(red, keepdim=True) if x.numel() else xd
    if weight is not None:
        y = y * weight.double()
    if bias is not None:
        y = y + bias.double()
    kd = torch.float64 if out == torch.float64 and not codes else torch.float32
    w = 1.0 if weight is None else weight.double().abs()
    b = 0.0 if bias is None else bias.double().abs()
    n = math.prod(x.shape[-dims:]) if x.dim() else 1
    k = 64 + (n if kd == torch.float64 else 0)  # float64 sums are accumulated in float64
    rounding = 2 * max(eps(out), eps(kd))  # the kernel dtype's result, then out's
    tol = k * eps(kd) * (big * r + 1) * w + rounding * (y.abs() + b) + _spacing(out)
    return y, tol


def l1_rms_norm(x, weight, eps_: float, out: torch.dtype, codes: bool):
    xd = x.double()
    r = 1.0 / (SQRT_HALF_PI * xd.abs().mean(-1, keepdim=True) + eps_)
    y = xd * r
    if weight is not None:
        y = y * weight.double()
    kd = torch.float64 if out == torch.float64 and not codes else torch.float32
    w = 1.0 if weight is None else weight.double().abs()
    big = xd.abs().amax(-1, keepdim=True) if x.numel() else xd
    k = 64 + (x.shape[-1] if kd == torch.float64 and x.dim() else 0)
    rounding = 2 * max(eps(out), eps(kd))
    tol = k * eps(kd) * (big * r + 1) * w + rounding * y.abs() + _spacing(out)
    return y, tol


def _spacing(out: torch.dtype) -> float:
    """The output dtype's subnormal spacing: an exact result below it rounds to a multiple of it
    (float16 keeps nothing finer than 6e-8), with 1e-30 as the floor of the float32 sums."""
    return max(torch.finfo(out).tiny * eps(out), 1e-30)


# ---- W4 ---------------------------------------------------------------------------------------


def w4_scales(w: torch.Tensor, group_size: int, zero_point: bool) -> torch.Tensor:
    """float64 [N, G] scales of the rule: (hi - lo) / 15 over the range widened to hold 0, or
    max|w| / 7; 1 where that is 0."""
    w = w.float().double()
    n, k = w.shape
    g = k if group_size == -1 else group_size
    groups = -(-k // g)
    padded = F.pad(w, (0, groups * g - k)).view(n, groups, g)
    if zero_point:
        s = (padded.amax(-1).clamp(min=0) - padded.amin(-1).clamp(max=0)) / 15
    else:
        s = padded.abs().amax(-1) / 7
    return torch.where(s == 0, 1.0, s)


def w4_dequantized(w) -> torch.Tensor:
    """float64 W_hat [N, K] = (q - zero) * scale of a W4Weight (stored codes, zero 8 when
    symmetric)."""
    n, k = w.shape
    g = k if w.group_size == -1 else w.group_size
    zeros = w.zeros.double() if w.zeros is not None else torch.full((n, w.scales.shape[1]), 8.0)
    per = lambda t: t.repeat_interleave(g, -1)[:, :k]  # noqa: E731
    return (w.stored_codes().double() - per(zeros)) * per(w.scales.double())


# ---- cross-entropy ----------------------------------------------------------------------------


def cross_entropy(e, c, targets, bias, ignore_index, softcap, reduction, shift, ls, z_loss):
    """(loss, lse) in float64 from the logits e @ c.T + bias, differentiable towards e, c, bias.
    Ignored tokens' rows of e stay out of the loss's graph (as rows a shift drops are out of
    torch's): the logits of the valid rows alone, so that neither their own inf / NaN nor an
    inf of c times their 0 reaches the gradients."""
    t = targets.long()
    if shift:
        t = torch.cat([t[..., shift:], torch.full_like(t[..., :shift], ignore_index)], -1)
    valid = t != ignore_index

    def logits(e_):
        z_ = e_.double() @ c.double().T
        if bias is not None:
            z_ = z_ + bias.double()
        return softcap * torch.tanh(z_ / softcap) if softcap is not None else z_

    lse_out = torch.logsumexp(logits(e), -1)
    z = logits(e[valid])
    lse = torch.logsumexp(z, -1)
    logp = z - lse[..., None]
    # A +inf logit makes the row NaN, as in torch's log-softmax (max subtracted: inf - inf).
    logp = logp.masked_fill(lse[..., None] == math.inf, math.nan)
    picked = torch.gather(logp, -1, t[valid][..., None])[..., 0]
    # Terms with a 0 factor are left out: 0 times an infinite term would be NaN.
    picked_rows = -(1 - ls) * picked if ls < 1 else torch.zeros_like(lse)
    if ls:
        picked_rows = picked_rows - ls * logp.mean(-1)
    if z_loss:
        picked_rows = picked_rows + z_loss * lse * lse
    row = torch.zeros(t.shape, dtype=torch.float64, device=lse.device)
    row = row.index_put((valid,), picked_rows) if t.dim() else row + picked_rows.sum()
    if shift:
        row, lse_out = row[..., :-shift], lse_out[..., :-shift]
    if reduction == "sum":
        loss = row.sum()
    elif reduction == "mean":
        loss = row.sum() / valid.sum().clamp(min=1)
    else:
        loss = row
    return loss, lse_out


# ---- packing ----------------------------------------------------------------------------------


def doc_tokens(doc: bytes, offset: int, bos: bool, eos: bool) -> list[int]:
    return [1] * bos + [b + offset for b in doc] + [2] * eos


def expected_pieces(docs, seq_len, offset, bos, eos, split_long):
    """The (tokens, targets) of every piece: documents cut into runs of seq_len tokens (or cut
    to their first seq_len), targets the next token of the same document, -100 at its end."""
    out = []
    for doc in docs:
        toks = doc_tokens(doc, offset, bos, eos)
        nexts = toks[1:] + [-100]
        starts = range(0, len(toks), seq_len) if split_long else range(min(1, len(toks)))
        for s in starts:
            out.append((tuple(toks[s : s + seq_len]), tuple(nexts[s : s + seq_len])))
    return out


def best_fit_rows(lengths: list[int], seq_len: int) -> int:
    """Rows best-fit decreasing needs for pieces of these lengths."""
    free: list[int] = []
    for n in sorted(lengths, reverse=True):
        fits = [i for i, f in enumerate(free) if f >= n]
        if fits:
            i = min(fits, key=lambda i: free[i])
            free[i] -= n
        else:
            free.append(seq_len - n)
    return len(free)


def document_mask(ids: torch.Tensor) -> torch.Tensor:
    n = ids.shape[-1]
    a, b = ids[..., :, None], ids[..., None, :]
    i = torch.arange(n)
    causal = i[None, :] <= i[:, None]
    return ((a == b) & causal & (a >= 0)) | ((a < 0) & (i[:, None] == i[None, :]))


def decode_bytes(ids: list[int], offset: int) -> str:
    return bytes(i - offset for i in ids if i >= offset).decode("utf-8", "replace")
