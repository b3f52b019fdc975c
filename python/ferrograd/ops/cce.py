"""Cut cross-entropy: the loss of ``e @ c.T + bias`` against targets without materializing the
[N, V] logits (Wijmans et al., "Cut Your Losses in Large-Vocabulary Language Models").

Per token i, with z = e_i c^T + bias (then z = softcap * tanh(z / softcap)) and
lse_i = logsumexp(z): loss_i = lse_i - (1 - ls) z[t_i] - ls / V * sum_j z_ij + z_loss * lse_i^2
(DESIGN.md section 5).

Both backends compute three numbers per row (lse, target logit, logit sum) in a forward pass, and
in the backward recompute the logits a block at a time and form the logit gradient
dz_ij = a_i p_ij - b_i [j = t_i] - u_i (times the softcap derivative) with
a = g (1 + 2 z_loss lse) + g_lse, b = g (1 - ls), u = g ls / V, for the row loss gradient g.

- CPU: the vocabulary in chunks; each chunk's logits come from torch's matmul into one reused
  buffer, the Rust core folds them into a running log-sum-exp (forward) or turns them into dz in
  place (backward), and two matmuls accumulate dE and dC. Extra memory: one [rows, chunk] buffer.
  float64 runs the same loop with torch ops per chunk (gradcheck).
- CUDA (float32 / fp16 / bf16, D x itemsize a multiple of 16 bytes): kernels/cce.cu through
  ``ferrograd.ops.cce_cuda``: a tiled forward (tensor cores for 16-bit inputs, fp32 FMA for
  float32) with the log-sum-exp on the fly, and a recomputing backward that skips blocks below
  filter_eps, with the vocabulary ordered by mean logit. Other CUDA inputs run the chunked loop
  with torch ops (cuBLAS matmuls into a 256 MiB float32 buffer).
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from .. import _core, cuda
from . import cce_cuda
from ._checks import check_floating, check_tensor

__all__ = ["chunked_backward", "chunked_forward", "linear_cross_entropy"]

OP = "linear_cross_entropy"
REDUCTIONS = ("mean", "sum", "none")
#: Elements of the reused logits buffer: 32 MiB of float32 on the CPU, 256 MiB on a GPU (where
#: larger chunks keep cuBLAS efficient).
CPU_BUFFER_ELEMS = 1 << 23
GPU_BUFFER_ELEMS = 1 << 26
#: The fewest vocabulary entries per CPU chunk (keeps torch's matmul efficient).
CPU_MIN_CHUNK = 256


def _blocks(rows: int, vocab: int, device: torch.device) -> tuple[int, int]:
    """Rows per block and vocabulary entries per chunk so that a block fits the buffer."""
    elems = CPU_BUFFER_ELEMS if device.type == "cpu" else GPU_BUFFER_ELEMS
    row_block = max(1, min(rows, elems // CPU_MIN_CHUNK))
    chunk = max(CPU_MIN_CHUNK, elems // row_block)
    return row_block, min(vocab, chunk)


def _chunk_logits(
    buf: torch.Tensor, e: torch.Tensor, c: torch.Tensor, bias: torch.Tensor | None, v0: int, v1: int
) -> torch.Tensor:
    """Raw logits of rows e against vocabulary v0..v1 in a contiguous view of ``buf``."""
    out = buf[: e.shape[0] * (v1 - v0)].view(e.shape[0], v1 - v0)
    cc = c[v0:v1].to(e.dtype)
    if bias is None:
        return torch.mm(e, cc.t(), out=out)
    return torch.addmm(bias[v0:v1].to(e.dtype), e, cc.t(), out=out)


def _softcap_(z: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return z if softcap is None else z.div_(softcap).tanh_().mul_(softcap)


def _forward_chunk(z, v0, targets, lse, target_logit, logit_sum, softcap) -> None:
    """Folds the raw chunk logits z (vocabulary v0..) into the running float64 ``lse``, the
    target logits and the logit sums: the Rust kernel for CPU float32, torch ops otherwise."""
    if z.device.type == "cpu" and z.dtype == torch.float32:
        _core.cce_forward_chunk(
            z,
            z.shape[1],
            v0,
            targets,
            lse,
            target_logit,
            logit_sum,
            softcap,
        )
        return
    _softcap_(z, softcap)
    torch.logaddexp(lse, torch.logsumexp(z, 1), out=lse)
    local = targets - v0
    inside = (local >= 0) & (local < z.shape[1])
    picked = z.gather(1, local.clamp(0, z.shape[1] - 1)[:, None])[:, 0]
    target_logit.copy_(torch.where(inside, picked, target_logit))
    if logit_sum is not None:
        logit_sum += z.sum(1)


def _backward_chunk(z, v0, targets, lse, coefs, softcap) -> float:
    """Turns the raw chunk logits z into the logit gradient in place and returns the chunk's
    largest |dz_ij| / max(|a_i|, |b_i|): the Rust kernel for CPU float32, torch ops otherwise."""
    if z.device.type == "cpu" and z.dtype == torch.float32:
        return _core.cce_backward_chunk(z, z.shape[1], v0, targets, lse, *coefs, softcap)
    a, b, u = coefs
    _softcap_(z, softcap)
    capped = z.clone() if softcap is not None else None
    z.sub_(lse[:, None]).exp_().mul_(a[:, None]).sub_(u[:, None])
    local = targets - v0
    rows = torch.nonzero((local >= 0) & (local < z.shape[1]))[:, 0]
    z[rows, local[rows]] -= b[rows]
    scale = torch.maximum(a.abs(), b.abs())
    has_grad = scale > 0
    peak = (z[has_grad].abs() / scale[has_grad, None]).amax() if bool(has_grad.any()) else 0.0
    if capped is not None:
        z.mul_(1 - (capped / softcap) ** 2)
    return float(peak)


def chunked_forward(
    e: torch.Tensor,
    c: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    softcap: float | None,
    want_sum: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(lse, target logit, logit sum or None) per row of e [N, D] (rows with targets < 0 get
    target logit 0), in float32 (float64 for float64 inputs), chunk by chunk on e's device."""
    kd = torch.float64 if e.dtype == torch.float64 else torch.float32
    rows, vocab = e.shape[0], c.shape[0]
    ek = e.to(kd)
    f64 = {"dtype": torch.float64, "device": e.device}
    lse = torch.full((rows,), -math.inf, **f64)
    target_logit = torch.zeros(rows, dtype=kd, device=e.device)
    logit_sum = torch.zeros(rows, **f64) if want_sum else None
    row_block, chunk = _blocks(rows, vocab, e.device)
    buf = torch.empty(min(rows, row_block) * chunk, dtype=kd, device=e.device)
    for r0 in range(0, rows, row_block):
        r1 = min(rows, r0 + row_block)
        state = (lse[r0:r1], target_logit[r0:r1], None if logit_sum is None else logit_sum[r0:r1])
        for v0 in range(0, vocab, chunk):
            z = _chunk_logits(buf, ek[r0:r1], c, bias, v0, min(vocab, v0 + chunk))
            _forward_chunk(z, v0, targets[r0:r1], *state, softcap)
    return lse.to(kd), target_logit, None if logit_sum is None else logit_sum.to(kd)


def chunked_backward(
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
    need_bias_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(dE, dC, dbias) for the logit gradient of the module docstring, recomputing the logits
    chunk by chunk; a chunk whose every |dz_ij| is below filter_eps * max(|a_i|, |b_i|) skips its
    two gradient matmuls (its dC rows and dbias entries are exactly 0)."""
    kd = lse.dtype
    rows, vocab = e.shape[0], c.shape[0]
    ek = e.to(kd)
    like = {"dtype": kd, "device": e.device}
    de = torch.zeros(rows, e.shape[1], **like)
    dc = torch.zeros(vocab, c.shape[1], **like)
    dbias = torch.zeros(vocab, **like) if need_bias_grad else None
    coefs = tuple(t.to(kd).contiguous() for t in (coef_softmax, coef_target, coef_uniform))
    row_block, chunk = _blocks(rows, vocab, e.device)
    buf = torch.empty(min(rows, row_block) * chunk, **like)
    for r0 in range(0, rows, row_block):
        r1 = min(rows, r0 + row_block)
        er, t, lse_r = ek[r0:r1], targets[r0:r1], lse[r0:r1]
        coefs_r = tuple(x[r0:r1] for x in coefs)
        for v0 in range(0, vocab, chunk):
            v1 = min(vocab, v0 + chunk)
            dz = _chunk_logits(buf, er, c, bias, v0, v1)
            peak = _backward_chunk(dz, v0, t, lse_r, coefs_r, softcap)
            if filter_eps is not None and peak < filter_eps:
                continue
            de[r0:r1].addmm_(dz, c[v0:v1].to(kd))
            dc[v0:v1].addmm_(dz.t(), er)
            if dbias is not None:
                dbias[v0:v1] += dz.sum(0)
    return de, dc, dbias


def _backend(e: torch.Tensor):
    """kernels/cce.cu for float32 / fp16 / bf16 on a GPU when D's rows are 16-byte multiples;
    the chunked loop otherwise (CPU, float64, odd D)."""
    if (
        e.is_cuda
        and e.dtype in (torch.float32, torch.float16, torch.bfloat16)
        and (e.shape[1] * e.element_size()) % 16 == 0
        and cuda.is_available()
    ):
        return cce_cuda.cce_forward_cuda, cce_cuda.cce_backward_cuda
    return chunked_forward, chunked_backward


class _LinearCrossEntropy(torch.autograd.Function):
    """Row losses (0 where ignored) and lse of e [N, D] against c [V, D]; targets [N] < 0 are
    ignored rows."""

    @staticmethod
    def forward(ctx, e, c, bias, targets, softcap, label_smoothing, z_loss, filter_eps):
        forward, _ = _backend(e)
        lse, target_logit, logit_sum = forward(e, c, bias, targets, softcap, label_smoothing > 0)
        row = lse - (1.0 - label_smoothing) * target_logit
        if logit_sum is not None:
            row = row - (label_smoothing / c.shape[0]) * logit_sum
        if z_loss:
            row = row + z_loss * lse * lse
        row = torch.where(targets >= 0, row, torch.zeros((), dtype=row.dtype, device=row.device))
        ctx.save_for_backward(e, c, bias, targets, lse)
        ctx.options = (softcap, label_smoothing, z_loss, filter_eps)
        return row, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_row, grad_lse):
        e, c, bias, targets, lse = ctx.saved_tensors
        softcap, label_smoothing, z_loss, filter_eps = ctx.options
        grad_row = torch.where(targets >= 0, grad_row, torch.zeros_like(grad_row))
        coef_softmax = grad_row * (1.0 + 2.0 * z_loss * lse) + grad_lse
        coef_target = grad_row * (1.0 - label_smoothing)
        coef_uniform = grad_row * (label_smoothing / c.shape[0])
        coefs = (coef_softmax, coef_target, coef_uniform)
        _, backward = _backend(e)
        de, dc, dbias = backward(
            e, c, bias, targets, lse, *coefs, softcap, filter_eps, bias is not None
        )
        dbias = None if dbias is None else dbias.to(bias.dtype)
        return de.to(e.dtype), dc.to(c.dtype), dbias, None, None, None, None, None


def _check_number(name: str, value: object, low: float, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{OP}: {name} must be a number, got {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{OP}: {name} must be in [{low}, {high}], got {value}")
    return float(value)


def _check_inputs(e, c, targets, bias) -> None:
    for name, t in (("e", e), ("c", c)):
        check_tensor(OP, name, t)
        check_floating(OP, name, t)
    check_tensor(OP, "targets", targets)
    if e.dim() < 1:
        raise ValueError(f"{OP}: e must have shape [..., D], got a 0-d tensor")
    if c.dim() != 2 or c.shape[1] != e.shape[-1] or c.shape[0] == 0:
        raise ValueError(
            f"{OP}: c must have shape [V, D] with V >= 1 and D = e.shape[-1] = {e.shape[-1]}, "
            f"got {tuple(c.shape)}"
        )
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"{OP}: targets must be an integer tensor (int64), got {targets.dtype}")
    if targets.shape != e.shape[:-1]:
        raise ValueError(
            f"{OP}: targets must have shape e.shape[:-1] = {tuple(e.shape[:-1])}, "
            f"got {tuple(targets.shape)}"
        )
    others = [("c", c), ("targets", targets)]
    if bias is not None:
        check_tensor(OP, "bias", bias)
        if bias.shape != (c.shape[0],):
            raise ValueError(
                f"{OP}: bias must have shape [V] = [{c.shape[0]}], got {tuple(bias.shape)}"
            )
        others.append(("bias", bias))
    for name, t in others:
        if t.device != e.device:
            raise ValueError(f"{OP}: {name} is on {t.device} but e is on {e.device}")
        if name != "targets" and t.dtype != e.dtype:
            raise TypeError(f"{OP}: {name} has dtype {t.dtype} but e has {e.dtype}")


def _filter_eps(filter_eps: object, dtype: torch.dtype, label_smoothing: float) -> float | None:
    """The gradient filter threshold; off with label smoothing, whose gradient is dense."""
    if filter_eps is None:
        return None
    if isinstance(filter_eps, str):
        if filter_eps != "auto":
            raise ValueError(
                f"{OP}: filter_eps must be 'auto', None or a number, got {filter_eps!r}"
            )
        filter_eps = torch.finfo(dtype).eps / 32
    eps = _check_number("filter_eps", filter_eps, 0.0, 1.0)
    return None if eps == 0.0 or label_smoothing > 0 else eps


def _shifted_targets(targets: torch.Tensor, shift: int, ignore_index: int) -> torch.Tensor:
    """targets[..., shift:] padded at the end with ignore_index: row i of e then meets target
    i + shift, and e is used as it is (no copy of e[..., :-shift, :])."""
    if shift == 0:
        return targets
    pad = torch.full_like(targets[..., :shift], ignore_index)
    return torch.cat([targets[..., shift:], pad], dim=-1)


def linear_cross_entropy(
    e: torch.Tensor,
    c: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    softcap: float | None = None,
    reduction: str = "mean",
    shift: int = 0,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    return_lse: bool = False,
    filter_eps: float | str | None = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of the logits ``e @ c.T + bias`` against ``targets``, never materialized.

    e [..., D] (float32, bfloat16, float16 or float64), c [V, D] and bias [V] of e's dtype,
    targets [...] integer with e's leading shape. ``softcap`` caps the logits as
    softcap * tanh(z / softcap); ``label_smoothing`` as in ``F.cross_entropy``; ``z_loss`` adds
    z_loss * lse^2 per token; ``shift=k`` pairs e[..., :-k, :] with targets[..., k:];
    ``reduction`` "mean" divides by the number of non-ignored tokens (0 when there are none).
    Returns the loss in e's dtype, and with ``return_lse`` also lse over the (shifted) token
    shape. ``filter_eps`` ("auto": finfo(e.dtype).eps / 32; None or 0: off) lets the backward
    skip blocks of the logit gradient whose entries are all below it relative to their row's
    gradient scale; it is off whenever label smoothing is on. Gradients flow to e, c, bias and
    through lse.
    """
    _check_inputs(e, c, targets, bias)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{OP}: ignore_index must be an int, got {type(ignore_index).__name__}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{OP}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if isinstance(shift, bool) or not isinstance(shift, int):
        raise TypeError(f"{OP}: shift must be an int, got {type(shift).__name__}")
    if shift and not 0 < shift <= (targets.shape[-1] if targets.dim() else 0):
        raise ValueError(
            f"{OP}: shift must be in [0, {targets.shape[-1] if targets.dim() else 0}] "
            f"(the length of targets' last dim), got {shift}"
        )
    if softcap is not None:
        softcap = _check_number("softcap", softcap, 0.0)
        if softcap == 0.0 or math.isinf(softcap):
            raise ValueError(f"{OP}: softcap must be a finite positive number, got {softcap}")
    label_smoothing = _check_number("label_smoothing", label_smoothing, 0.0, 1.0)
    z_loss = _check_number("z_loss", z_loss, 0.0)
    eps = _filter_eps(filter_eps, e.dtype, label_smoothing)

    vocab = c.shape[0]
    shifted = _shifted_targets(targets.long(), shift, ignore_index)
    valid = shifted != ignore_index
    out_of_range = valid & ((shifted < 0) | (shifted >= vocab))
    if bool(out_of_range.any()):
        bad = int(shifted[out_of_range][0])
        raise ValueError(
            f"{OP}: targets must be in [0, {vocab}) or ignore_index ({ignore_index}), got {bad}"
        )
    flat_targets = torch.where(valid, shifted, -1).reshape(-1).contiguous()
    e2 = e.reshape(-1, e.shape[-1])
    if e.is_cuda:
        e2, c = e2.contiguous(), c.contiguous()
        bias = None if bias is None else bias.contiguous()
    row, lse = _LinearCrossEntropy.apply(
        e2, c, bias, flat_targets, softcap, label_smoothing, z_loss, eps
    )
    row, lse = row.view(targets.shape), lse.view(targets.shape)
    if shift:
        row, lse = row[..., :-shift], lse[..., :-shift]
    if reduction == "none":
        loss = row
    elif reduction == "sum":
        loss = row.sum()
    else:
        loss = row.sum() / valid.sum().clamp(min=1)
    loss = loss.to(e.dtype)
    return (loss, lse.to(e.dtype)) if return_lse else loss
