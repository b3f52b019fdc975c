"""Cut cross-entropy as loops over vocabulary chunks in plain torch ops: the kernel of float64
(gradcheck runs through it) and of every device and dtype without a ferrograd kernel, and the
loops the CPU kernel (cpu.py) runs with the Rust row kernels in place of :func:`fold_chunk`,
:func:`grad_chunk` and :func:`fused_rows`.

Rows of e [N, D] meet vocabulary chunks of c [V, D]; each chunk's raw logits land in one reused
buffer (32 MiB of float32 on the CPU, 256 MiB on a GPU). The forward folds them into a running
float64 log-sum-exp, the target logit and (label smoothing) the logit sum; the backward turns
them into the logit gradient in place and accumulates dE and dC with two matmuls. The fused
pass (:func:`fused`) takes blocks of rows over the whole vocabulary and does both at once.
Extra memory: the buffer. Computed in float32 (float64 for float64 inputs); the matmuls run in
``gemm_dtype`` (the compute dtype unless a kernel asks for bfloat16: then each chunk's logits
are rounded to bfloat16 by the matmul, as a bfloat16 ``nn.Linear`` rounds them, and so is the
logit gradient that meets c and e in the backward, while the sums stay float32). ``native``:
the row kernels read and write the matmul's dtype themselves (the Rust ones: no float32 copy).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .._checks import compute_dtype
from .._memory import fresh

#: Elements of the reused logits buffer: 32 MiB of float32 on the CPU, 256 MiB on a GPU (where
#: larger chunks keep cuBLAS efficient).
CPU_BUFFER_ELEMS = 1 << 23
GPU_BUFFER_ELEMS = 1 << 26
#: The fewest vocabulary entries per chunk (keeps the matmuls efficient).
CPU_MIN_CHUNK = 256
#: The fused pass's buffer holds at least FUSED_MIN_ROWS rows of logits over the whole
#: vocabulary, more while it stays within FUSED_BUFFER_ELEMS elements: the bf16 matmuls lose
#: 1.3-1.5x at 64-128 rows (docs/cce.md has the measurements).
FUSED_MIN_ROWS = 256
FUSED_BUFFER_ELEMS = 1 << 23

OP = "linear_cross_entropy"


def check_targets(targets: torch.Tensor, vocab: int) -> None:
    """Refuses targets outside [0, V) other than -1 (an ignored row), where that costs no device
    synchronization: the public function checks eagerly, this catches what a compiled graph
    passes."""
    if targets.device.type != "cpu" or targets.numel() == 0:
        return
    low, high = (int(x) for x in torch.aminmax(targets))
    if low < -1 or high >= vocab:
        bad = high if high >= vocab else low
        raise ValueError(f"{OP}: targets must be in [0, {vocab}) or ignored, got {bad}")


def _blocks(rows: int, vocab: int, device: torch.device) -> tuple[int, int]:
    """Rows per block and vocabulary entries per chunk so that a block fits the buffer."""
    elems = CPU_BUFFER_ELEMS if device.type == "cpu" else GPU_BUFFER_ELEMS
    row_block = max(1, min(rows, elems // CPU_MIN_CHUNK))
    chunk = max(CPU_MIN_CHUNK, elems // row_block)
    return row_block, min(vocab, chunk)


def _view(buf: torch.Tensor | None, rows: int, width: int) -> torch.Tensor | None:
    return None if buf is None else buf[: rows * width].view(rows, width)


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)``, a cast copy written into a :func:`fresh` tensor."""
    return t if t.dtype == dtype else fresh(torch.empty_like(t, dtype=dtype)).copy_(t)


class _Buffers:
    """The reused chunk buffers: the logits in the compute dtype and, when the matmuls run in
    another dtype whose output the row kernels cannot read (``native`` False), their output
    (and the backward's rounded logit gradient) in that dtype."""

    def __init__(
        self, elems: int, kd: torch.dtype, gemm_dtype: torch.dtype, device, native: bool = False
    ) -> None:
        same = gemm_dtype == kd or native
        self.z = fresh(torch.empty(elems, dtype=gemm_dtype if same else kd, device=device))
        self.gemm = None if same else fresh(torch.empty(elems, dtype=gemm_dtype, device=device))

    def logits(
        self, e: torch.Tensor, c: torch.Tensor, bias: torch.Tensor | None, v0: int, v1: int
    ) -> torch.Tensor:
        """Raw logits of rows e (in the matmul dtype) against vocabulary v0..v1, in a
        contiguous view of the buffer."""
        rows, width = e.shape[0], v1 - v0
        z = _view(self.z, rows, width)
        out = _view(self.gemm, rows, width)
        cc = c[v0:v1].to(e.dtype)
        if bias is None:
            torch.mm(e, cc.t(), out=z if out is None else out)
        else:
            torch.addmm(bias[v0:v1].to(e.dtype), e, cc.t(), out=z if out is None else out)
        return z if out is None else z.copy_(out)

    def rounded(self, dz: torch.Tensor) -> torch.Tensor:
        """The logit gradient in the matmul dtype."""
        out = _view(self.gemm, *dz.shape)
        return dz if out is None else out.copy_(dz)


def _softcap_(z: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return z if softcap is None else z.div_(softcap).tanh_().mul_(softcap)


def fold_chunk(z, v0, targets, lse, target_logit, logit_sum, softcap) -> None:
    """Folds the raw chunk logits z (vocabulary v0..) into the running float64 ``lse``, the
    target logits and the logit sums (None: not wanted)."""
    _softcap_(z, softcap)
    torch.logaddexp(lse, torch.logsumexp(z, 1), out=lse)
    local = targets - v0
    inside = (local >= 0) & (local < z.shape[1])
    picked = z.gather(1, local.clamp(0, z.shape[1] - 1)[:, None])[:, 0]
    target_logit.copy_(torch.where(inside, picked, target_logit))
    if logit_sum is not None:
        logit_sum += z.sum(1)


def grad_chunk(z, v0, targets, lse, coefs, softcap) -> float:
    """Turns the raw chunk logits z into the logit gradient in place and returns the chunk's
    largest |dz_ij| / max(|a_i|, |b_i|) (see ``chunked_backward``)."""
    return _grad_capped(_softcap_(z, softcap), v0, targets, lse, coefs, softcap)


def without_gradient(coefs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The rows that take no part in the backward: all three coefficients 0 (ignored rows)."""
    a, b, u = coefs
    return (a == 0) & (b == 0) & (u == 0)


def _grad_capped(z, v0, targets, lse, coefs, softcap) -> float:
    """:func:`grad_chunk` on logits already capped."""
    a, b, u = coefs
    capped = z.clone() if softcap is not None else None
    z.sub_(lse[:, None]).exp_().mul_(a[:, None]).sub_(u[:, None])
    local = targets - v0
    rows = torch.nonzero((local >= 0) & (local < z.shape[1]))[:, 0]
    z[rows, local[rows]] -= b[rows]
    scale = torch.maximum(a.abs(), b.abs())
    has_grad = scale != 0  # a NaN scale counts, so that its NaN keeps the chunk from the filter
    peak = (z[has_grad].abs() / scale[has_grad, None]).amax() if bool(has_grad.any()) else 0.0
    if capped is not None:
        z.mul_(1 - (capped / softcap) ** 2)
    # Rows without a gradient (ignored: all three coefficients 0) get 0, not 0 * NaN where
    # their logits are NaN (a NaN in C), as the Rust kernels write them.
    z.masked_fill_(without_gradient(coefs)[:, None], 0.0)
    return float(peak)


def fused_rows(
    z, targets, lse, target_logit, logit_sum, peaks, piece, scale, softcap, label_smoothing, z_loss
) -> None:
    """The fused pass over raw logits z [rows, V] spanning the whole vocabulary: each row's
    lse, target logit (NaN without one) and logit sum (None: not wanted) into the given
    tensors, then z in place becomes the gradient of ``scale`` x the summed row losses, and
    ``peaks`` gets per piece of ``piece`` columns the largest |dz_ij| / max(|a_i|, |b_i|)."""
    vocab = z.shape[1]
    lse64 = torch.full(lse.shape, -math.inf, dtype=torch.float64, device=z.device)
    sums = None if logit_sum is None else torch.zeros_like(lse64)
    target_logit.fill_(math.nan)
    fold_chunk(z, 0, targets, lse64, target_logit, sums, softcap)  # caps z in place
    lse.copy_(lse64)
    if logit_sum is not None:
        logit_sum.copy_(sums)
    valid = targets >= 0
    weight = valid.to(lse.dtype) * scale
    coefs = coefficients(weight, 0.0, lse, valid, label_smoothing, z_loss, vocab)
    for k, v0 in enumerate(range(0, vocab, piece)):
        peaks[k] = _grad_capped(z[:, v0 : v0 + piece], v0, targets, lse, coefs, softcap)


def _not_finite(e: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """Rows holding a NaN or inf: in e itself (under softcap an inf of e gives capped, finite
    logits and a finite lse), or in their lse (from c)."""
    return ~(lse.isfinite() & e.isfinite().all(-1))


def quiet_ignored_rows(
    e: torch.Tensor, lse: torch.Tensor, coefs: tuple[torch.Tensor, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(e, lse) with the rows that take no part in the backward (all three coefficients 0:
    ignored) but hold a NaN or inf (``_not_finite``) set to e = 0 and lse = inf: their dz is
    then exactly 0 instead of 0 * NaN, and their e no longer reaches dC. Off the CPU without a
    host synchronization (always copies)."""
    if e.device.type == "cpu":
        bad = nonfinite_rows(torch.nonzero(without_gradient(coefs))[:, 0], e, lse)
        if not bad.numel():
            return e, lse
        return e.index_fill(0, bad, 0), lse.index_fill(0, bad, math.inf)
    idle = _not_finite(e, lse) & without_gradient(coefs)
    return torch.where(idle[:, None], 0, e), lse.masked_fill(idle, math.inf)


def nonfinite_rows(rows: torch.Tensor, e: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """Those of the row indices ``rows`` whose e or lse hold a NaN or inf (``_not_finite``),
    tested on those rows alone: a test of every row of e was a tenth of a small-vocabulary
    loss (4096 x 128 e, V = 260), where the rows that need it (ignored ones) are few."""
    if not rows.numel():
        return rows
    return rows[_not_finite(e[rows], lse[rows])]


def _row_blocks(row_block: int, *tensors: torch.Tensor | None):
    """The tensors (sharing their first dim) a block of ``row_block`` rows at a time; the
    tensors themselves when they fit one block."""
    rows = tensors[0].shape[0]
    if rows <= row_block:
        yield tensors
        return
    for r0 in range(0, rows, row_block):
        yield tuple(None if t is None else t[r0 : r0 + row_block] for t in tensors)


def chunked_forward(
    e: torch.Tensor,
    c: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    softcap: float | None,
    want_sum: bool,
    fold: Callable = fold_chunk,
    gemm_dtype: torch.dtype | None = None,
    native: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(lse, target logit, logit sum or None) per row of e [N, D], in the compute dtype, chunk
    by chunk on e's device. A row whose target is in no chunk (ignored, or out of range in a
    graph no check saw) keeps target logit NaN. ``native``: ``fold`` reads the matmul's output
    in ``gemm_dtype`` as it is."""
    kd = compute_dtype(e.dtype)
    rows, vocab = e.shape[0], c.shape[0]
    f64 = {"dtype": torch.float64, "device": e.device}
    lse = torch.full((rows,), -math.inf, **f64)
    target_logit = torch.full((rows,), math.nan, dtype=kd, device=e.device)
    logit_sum = torch.zeros(rows, **f64) if want_sum else None
    row_block, chunk = _blocks(rows, vocab, e.device)
    gemm_dtype = gemm_dtype or kd
    bufs = _Buffers(min(rows, row_block) * chunk, kd, gemm_dtype, e.device, native)
    rows_state = (targets, lse, target_logit, logit_sum)
    for er, *state in _row_blocks(row_block, e.to(gemm_dtype), *rows_state):
        for v0 in range(0, vocab, chunk):
            z = bufs.logits(er, c, bias, v0, min(vocab, v0 + chunk))
            fold(z, v0, *state, softcap)
    return lse.to(kd), target_logit, None if logit_sum is None else logit_sum.to(kd)


def chunked_backward(
    e: torch.Tensor,
    c: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    lse: torch.Tensor,
    coefs: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    softcap: float | None,
    filter_eps: float | None,
    bias_grad: bool,
    grad: Callable = grad_chunk,
    gemm_dtype: torch.dtype | None = None,
    native: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dE in the compute dtype, dC, dbias in the compute dtype) for the logit gradient
    dz_ij = a_i p_ij - b_i [j = t_i] - u_i (times the softcap derivative), coefs = (a, b, u),
    recomputing the logits chunk by chunk; a chunk whose every |dz_ij| is below
    filter_eps * max(|a_i|, |b_i|) skips its two gradient matmuls (its dC rows and dbias entries
    are exactly 0). dbias is empty unless ``bias_grad``. When the rows fit one block, each dC
    row comes from one matmul, written straight into c's dtype where the matmuls run in it;
    otherwise dC sums over the row blocks in the compute dtype."""
    kd = lse.dtype
    rows, vocab = e.shape[0], c.shape[0]
    like = {"dtype": kd, "device": e.device}
    gemm_dtype = gemm_dtype or kd
    coefs = [t.to(kd).contiguous() for t in coefs]
    eg, lse = quiet_ignored_rows(e.to(gemm_dtype), lse, coefs)
    row_block, chunk = _blocks(rows, vocab, e.device)
    direct = rows <= row_block and c.dtype == gemm_dtype
    de = fresh(torch.empty(rows, e.shape[1], **like)).zero_()
    dc = fresh(torch.empty_like(c) if direct else torch.empty(vocab, c.shape[1], **like))
    if not direct:
        dc.zero_()
    dbias = torch.zeros(vocab if bias_grad else 0, **like)
    bufs = _Buffers(min(rows, row_block) * chunk, kd, gemm_dtype, e.device, native)
    for er, de_r, t, lse_r, *coefs_r in _row_blocks(row_block, eg, de, targets, lse, *coefs):
        for v0 in range(0, vocab, chunk):
            v1 = min(vocab, v0 + chunk)
            dz = bufs.logits(er, c, bias, v0, v1)
            peak = grad(dz, v0, t, lse_r, coefs_r, softcap)
            if filter_eps is not None and peak < filter_eps:
                if direct:
                    dc[v0:v1].zero_()
                continue
            if bias_grad:
                dbias[v0:v1] += dz.sum(0, dtype=kd)
            dzg = bufs.rounded(dz)
            cg = c[v0:v1].to(gemm_dtype)
            if direct:
                torch.mm(dzg.t(), er, out=dc[v0:v1])
            if dzg.dtype == kd:
                de_r.addmm_(dzg, cg)
                if not direct:
                    dc[v0:v1].addmm_(dzg.t(), er)
            else:  # the products in the matmul dtype, their sums over chunks in float32
                de_r += torch.mm(dzg, cg)
                if not direct:
                    dc[v0:v1] += torch.mm(dzg.t(), er)
    # Rows that take no part: their dE is exactly 0, not 0 * an inf of C.
    de.masked_fill_(without_gradient(coefs)[:, None], 0)
    return de, dc, dbias


#: Elements per mixed-dtype add of ``_Accumulator`` (its two float32 temporaries: 1 MiB each).
_ADD_ELEMS = 1 << 18


class _Accumulator:
    """out[v0:v1] = or += a @ b, for an ``out`` in the products' dtype or in a narrower one
    (bfloat16 from float32 products): then a piece of ``scratch``'s rows at a time through
    ``scratch``, so that no product of the whole range exists at once."""

    def __init__(self, out: torch.Tensor, scratch: torch.Tensor | None) -> None:
        self.out, self.scratch = out, scratch

    def add(self, v0: int, v1: int, a: torch.Tensor, b: torch.Tensor, accumulate: bool) -> None:
        out = self.out
        if out.dtype == a.dtype:
            if accumulate:
                out[v0:v1].addmm_(a, b)
            else:
                torch.mm(a, b, out=out[v0:v1])
            return
        piece = self.scratch.shape[0]
        for p0 in range(v0, v1, piece):
            p1 = min(v1, p0 + piece)
            prod = torch.mm(a[p0 - v0 : p1 - v0], b, out=self.scratch[: p1 - p0])
            if not accumulate:
                out[p0:p1].copy_(prod)
                continue
            # A bfloat16 += float32 materializes the float32 upcast and sum (two copies of
            # the operand): a few rows at a time they stay small.
            rows = max(1, _ADD_ELEMS // out.shape[1])
            for q0 in range(p0, p1, rows):
                q1 = min(p1, q0 + rows)
                out[q0:q1] += prod[q0 - p0 : q1 - p0]


class _CastPieces:
    """c for the fused pass's two matmuls against it: as it is where the matmuls run in its
    dtype, otherwise cast a piece of ``scratch``'s rows at a time into ``scratch`` (each piece
    is read by its matmul while it is in cache; the logits land in place in the buffer)."""

    def __init__(self, c: torch.Tensor, dtype: torch.dtype, scratch: torch.Tensor | None) -> None:
        self.c, self.dtype, self.scratch = c, dtype, scratch
        self.piece = c.shape[0] if c.dtype == dtype else scratch.shape[0]

    def _runs(self):
        vocab = self.c.shape[0]
        for v0 in range(0, vocab, self.piece):
            v1 = min(vocab, v0 + self.piece)
            cc = self.c[v0:v1]
            yield v0, v1, cc if cc.dtype == self.dtype else self.scratch[: v1 - v0].copy_(cc)

    def logits(self, bufs: _Buffers, e: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The raw logits of rows e over the whole vocabulary (:meth:`_Buffers.logits`)."""
        if self.piece == self.c.shape[0]:
            return bufs.logits(e, self.c, bias, 0, self.piece)
        z = _view(bufs.z, e.shape[0], self.c.shape[0])
        for v0, v1, cc in self._runs():
            if bias is None:
                torch.mm(e, cc.t(), out=z[:, v0:v1])
            else:
                torch.addmm(bias[v0:v1], e, cc.t(), out=z[:, v0:v1])
        return z

    def mm(self, dz: torch.Tensor, out: torch.Tensor) -> None:
        """out = dz @ c."""
        for v0, v1, cc in self._runs():
            if v0 == 0:
                torch.mm(dz[:, v0:v1], cc, out=out)
            else:
                out.addmm_(dz[:, v0:v1], cc)


def fused(
    e: torch.Tensor,
    c: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    divisor: torch.Tensor,
    softcap: float | None,
    label_smoothing: float,
    z_loss: float,
    filter_eps: float | None,
    e_grad: bool,
    c_grad: bool,
    bias_grad: bool,
    *,
    rows_fn: Callable = fused_rows,
    gemm_dtype: torch.dtype | None = None,
    native: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, dE, dC, dbias): loss = the row losses' sum / divisor (a 0-d tensor) in the
    compute dtype and its gradients in the dtypes of e, c and bias (each empty unless asked
    for), in one pass. Rows are taken a block at a time with the whole vocabulary: one matmul
    gives the block's logits, ``rows_fn`` (:func:`fused_rows`) turns them into lse, target
    logit, logit sum and in place into the logit gradient, then dE_block = dZ C and
    dC += dZ^T E_block: three matmul passes in all, against four for forward + recomputing
    backward. dC accumulates in place in the matmul dtype (one rounding per row block there);
    the filter works on the backward's chunks of the vocabulary: a chunk below it in a row
    block skips its share of dC and dbias (dE, one matmul over the whole vocabulary, is
    exact)."""
    kd = compute_dtype(e.dtype)
    rows, vocab = e.shape[0], c.shape[0]
    check_targets(targets, vocab)
    gemm_dtype = gemm_dtype or kd
    like = {"dtype": kd, "device": e.device}
    bg = None if bias is None else bias.to(gemm_dtype)
    # c in the matmul dtype a piece of the vocabulary at a time where that is not its own dtype
    # (float16, or bfloat16 where the CPU has no bfloat16 matmul): a whole float32 copy of c was
    # a third of the pass's peak memory.
    piece = _blocks(rows, vocab, e.device)[1]
    # One buffer of ``piece`` rows of D in the matmul dtype for the pieces of c cast into it and
    # for the float32 products of a bfloat16 dC (never in use at once): fresh casts churned
    # the allocator, and glibc kept the freed blocks resident.
    dc_dtype = c.dtype if c.dtype == torch.bfloat16 else gemm_dtype
    scratch = None
    if c.dtype != gemm_dtype or (c_grad and dc_dtype != gemm_dtype):
        scratch = torch.empty(min(piece, vocab), c.shape[1], dtype=gemm_dtype, device=e.device)
    pieces = _CastPieces(c, gemm_dtype, scratch)
    scale = 1.0 / float(divisor)
    lse, target_logit = torch.empty(rows, **like), torch.empty(rows, **like)
    logit_sum = torch.empty(rows, **like) if label_smoothing > 0 else None
    # dE in e's dtype: a row block's sum over the vocabulary runs in the matmul dtype in a
    # buffer of the block and is rounded once into it, as a whole copy of dE (and of e) in the
    # matmul dtype was before (N x D each: 4 MiB at 2048 x 512, 128 MiB at 8192 x 4096).
    de = fresh(e.new_empty(rows if e_grad else 0, e.shape[1]))
    # A bfloat16 dC accumulates in bfloat16 (rounded once per row block) also where the matmuls
    # run in float32: a float32 sum of V x D would double the pass's peak memory.
    dc = fresh(torch.empty(vocab if c_grad else 0, c.shape[1], dtype=dc_dtype, device=e.device))
    dc_acc = _Accumulator(dc, scratch)
    dbias = torch.zeros(vocab if bias_grad else 0, **like)
    row_block = max(1, min(rows, max(FUSED_MIN_ROWS, FUSED_BUFFER_ELEMS // vocab)))
    peaks = torch.empty(-(-vocab // piece), dtype=kd)
    written = [False] * peaks.numel()  # per piece of dC: by an earlier block's matmul
    bufs = _Buffers(min(rows, row_block) * vocab, kd, gemm_dtype, e.device, native)
    de_block = None
    if e_grad and e.dtype != gemm_dtype:
        de_block = e.new_empty(min(rows, row_block), e.shape[1], dtype=gemm_dtype)
    for r0 in range(0, rows, row_block):
        r1 = min(rows, r0 + row_block)
        er, t, lse_r = e[r0:r1].to(gemm_dtype), targets[r0:r1], lse[r0:r1]
        sums = None if logit_sum is None else logit_sum[r0:r1]
        z = pieces.logits(bufs, er, bg)
        rows_fn(z, t, lse_r, target_logit[r0:r1], sums, peaks, piece, scale, softcap,
                label_smoothing, z_loss)  # fmt: skip
        dz = bufs.rounded(z)
        ignored = torch.nonzero(t < 0)[:, 0]
        keep = [filter_eps is None or not p < filter_eps for p in peaks.tolist()]  # NaN kept
        if e_grad:  # (over the whole vocabulary: filtering would save nothing here)
            de_r = de[r0:r1] if de_block is None else de_block[: r1 - r0]
            pieces.mm(dz, de_r)
            # Ignored rows' dz is 0: their dE is exactly 0, not 0 * an inf of C.
            de_r.index_fill_(0, ignored, 0)
            if de_block is not None:
                de[r0:r1].copy_(de_r)
        if not (c_grad or bias_grad):
            continue
        idle = nonfinite_rows(ignored, er, lse_r)  # their NaN or inf must not reach dC
        if idle.numel():
            er = er.index_fill(0, idle, 0)
        for k0, k1 in _runs(keep, written if c_grad else None):
            v0, v1 = k0 * piece, min(vocab, k1 * piece)
            if bias_grad:
                dbias[v0:v1] += dz[:, v0:v1].sum(0, dtype=kd)
            if c_grad:
                dc_acc.add(v0, v1, dz[:, v0:v1].t(), er, written[k0])
                written[k0:k1] = [True] * (k1 - k0)
    for k0, k1 in _runs([not w for w in written]) if c_grad else ():
        dc[k0 * piece : k1 * piece].zero_()
    row = row_loss(lse, target_logit, logit_sum, targets, vocab, label_smoothing, z_loss)
    bias_dtype = e.dtype if bias is None else bias.dtype
    # The buffer goes before dC is cast to c's dtype, so that the cast is not the peak.
    bufs = z = dz = er = dc_acc = pieces = scratch = de_block = None
    return row.sum() / divisor, de, _cast(dc, c.dtype), dbias.to(bias_dtype)


def _runs(keep: list[bool], written: list[bool] | None = None):
    """The (k0, k1) ranges of consecutive kept pieces, also split where ``written`` changes."""
    start = None
    for k in range(len(keep) + 1):
        cut = k == len(keep) or not keep[k]
        if not cut and start is not None and written is not None:
            cut = written[k] != written[start]
        if start is not None and cut:
            yield start, k
            start = None
        if k < len(keep) and keep[k] and start is None:
            start = k


def parts(
    e: torch.Tensor,
    c: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    softcap: float | None,
    want_sum: bool,
    *,
    fold: Callable = fold_chunk,
    gemm_dtype: torch.dtype | None = None,
    native: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lse, target logit, logit sum) per row, the pieces :func:`row_loss` combines: the
    target logit of a row whose target is not in c is 0, the logit sum empty unless
    ``want_sum`` (for a vocabulary split over ranks, ops/cce/parallel.py)."""
    lse, target_logit, logit_sum = chunked_forward(
        e, c, bias, targets, softcap, want_sum, fold, gemm_dtype, native
    )
    target_logit.masked_fill_(targets < 0, 0.0)
    return lse, target_logit, lse.new_empty(0) if logit_sum is None else logit_sum


def coefficients(
    grad_row: torch.Tensor,
    grad_lse: torch.Tensor,
    lse: torch.Tensor,
    valid: torch.Tensor,
    label_smoothing: float,
    z_loss: float,
    vocab: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The logit gradient's row coefficients (a, b, u) for the row loss gradient ``grad_row``
    and the lse gradient ``grad_lse`` over a vocabulary of ``vocab`` entries (the options'
    constant terms skipped; ignored rows, ``valid`` False, get 0)."""
    grad_row = torch.where(valid, grad_row, 0.0)
    coef_softmax = grad_row
    if z_loss:  # where(): an ignored row's NaN lse must not reach its a
        coef_softmax = torch.where(valid, grad_row * (1.0 + 2.0 * z_loss * lse), 0.0)
    coef_target = grad_row * (1.0 - label_smoothing) if label_smoothing else grad_row
    return coef_softmax + grad_lse, coef_target, grad_row * (label_smoothing / vocab)


def row_loss(
    lse: torch.Tensor,
    target_logit: torch.Tensor,
    logit_sum: torch.Tensor | None,
    targets: torch.Tensor,
    vocab: int,
    label_smoothing: float,
    z_loss: float,
) -> torch.Tensor:
    """lse_i - (1 - ls) z[t_i] - ls / V * sum_j z_ij + z_loss * lse_i^2, 0 for ignored rows;
    NaN for a row with a +inf logit (lse +inf), as torch's cross-entropy has it (its
    log-softmax subtracts the max: inf - inf), where the formula would give +inf."""
    row = lse - (1.0 - label_smoothing) * target_logit if label_smoothing else lse - target_logit
    if logit_sum is not None:
        row = row - (label_smoothing / vocab) * logit_sum
    if z_loss:
        row = row + z_loss * lse * lse
    row = row.masked_fill_(lse == math.inf, math.nan)
    return row.masked_fill_(targets < 0, 0.0)


def forward(
    e: torch.Tensor,
    c: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    softcap: float | None,
    label_smoothing: float,
    z_loss: float,
    filter_eps: float | None,
    *,
    fold: Callable = fold_chunk,
    gemm_dtype: torch.dtype | None = None,
    native: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row loss, lse) per row of e [N, D] against c [V, D] for targets [N] (-1: ignored row),
    in the compute dtype. ``filter_eps`` is the backward's."""
    vocab = c.shape[0]
    check_targets(targets, vocab)
    lse, target_logit, logit_sum = chunked_forward(
        e, c, bias, targets, softcap, label_smoothing > 0, fold, gemm_dtype, native
    )
    return row_loss(lse, target_logit, logit_sum, targets, vocab, label_smoothing, z_loss), lse


def backward(
    e: torch.Tensor,
    c: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    lse: torch.Tensor,
    coef_softmax: torch.Tensor,
    coef_target: torch.Tensor,
    coef_uniform: torch.Tensor,
    softcap: float | None,
    filter_eps: float | None,
    bias_grad: bool,
    *,
    grad: Callable = grad_chunk,
    gemm_dtype: torch.dtype | None = None,
    native: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dE, dC, dbias) in the dtypes of e, c and bias (dbias empty unless ``bias_grad``)."""
    coefs = (coef_softmax, coef_target, coef_uniform)
    de, dc, dbias = chunked_backward(
        e, c, bias, targets, lse, coefs, softcap, filter_eps, bias_grad, grad, gemm_dtype, native
    )
    bias_dtype = e.dtype if bias is None else bias.dtype
    return _cast(de, e.dtype), _cast(dc, c.dtype), dbias.to(bias_dtype)
