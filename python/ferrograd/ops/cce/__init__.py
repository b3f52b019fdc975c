"""Cut cross-entropy: the loss of ``e @ c.T + bias`` against targets without materializing the
[N, V] logits (Wijmans et al., "Cut Your Losses in Large-Vocabulary Language Models").

Per token i, with z = e_i c^T + bias (then z = softcap * tanh(z / softcap)) and
lse_i = logsumexp(z): loss_i = lse_i - (1 - ls) z[t_i] - ls / V * sum_j z_ij + z_loss * lse_i^2
(docs/definitions.md).

Three ops: ``ferrograd::linear_cross_entropy`` gives per row of e [N, D] the loss term and lse
(three numbers per row in one pass: lse, target logit, logit sum), differentiable towards e, c,
bias and through lse; ``ferrograd::linear_cross_entropy_backward`` recomputes the logits a block
at a time and forms the logit gradient dz_ij = a_i p_ij - b_i [j = t_i] - u_i (times the softcap
derivative) with a = g (1 + 2 z_loss lse) + g_lse, b = g (1 - ls), u = g ls / V, for the row loss
gradient g, into dE, dC and dbias. ``ferrograd::linear_cross_entropy_fused`` serves a summed or
averaged loss on the CPU when gradients are wanted: each row's g is then known in the forward
(1 / divisor), so it computes the loss and its gradients in one pass (3 matmul passes instead of
4) and its backward only scales them by the scalar upstream gradient (docs/cce.md). Kernels:
cpu.py (Rust row kernels), cuda.py (kernels/cce.cu), reference.py (the chunk loops in torch
ops: float64 and every other device); small.py sends eager calls with few logits to torch's
cross-entropy, which then costs less than the op's call.
"""

from __future__ import annotations

import math

import torch

from .. import _library
from .._checks import as_int, check_floating, check_number, check_tensor
from . import cpu, cuda, parallel, reference, small

__all__ = ["linear_cross_entropy"]

OP = "linear_cross_entropy"
REDUCTIONS = ("mean", "sum", "none")


def _fake(e, c, bias, targets, softcap, label_smoothing, z_loss, filter_eps):
    kd = reference.compute_dtype(e.dtype)
    return e.new_empty(e.shape[0], dtype=kd), e.new_empty(e.shape[0], dtype=kd)


def _fake_backward(
    e,
    c,
    bias,
    targets,
    lse,
    coef_softmax,
    coef_target,
    coef_uniform,
    softcap,
    filter_eps,
    bias_grad,
):
    db = (e if bias is None else bias).new_empty(c.shape[0] if bias_grad else 0)
    return e.new_empty(e.shape), c.new_empty(c.shape), db


linear_cross_entropy_op = _library.define(
    "linear_cross_entropy(Tensor e, Tensor c, Tensor? bias, Tensor targets, float? softcap, "
    "float label_smoothing, float z_loss, float? filter_eps) -> (Tensor, Tensor)",
    cpu=cpu.forward,
    cuda=cuda.forward,
    reference=reference.forward,
    fake=_fake,
)
linear_cross_entropy_backward_op = _library.define(
    "linear_cross_entropy_backward(Tensor e, Tensor c, Tensor? bias, Tensor targets, Tensor lse, "
    "Tensor coef_softmax, Tensor coef_target, Tensor coef_uniform, float? softcap, "
    "float? filter_eps, bool bias_grad) -> (Tensor, Tensor, Tensor)",
    cpu=cpu.backward,
    cuda=cuda.backward,
    reference=reference.backward,
    fake=_fake_backward,
)


def _fake_fused(e, c, bias, targets, divisor, *args):
    e_grad, c_grad, bias_grad = args[-3:]
    loss = e.new_empty((), dtype=reference.compute_dtype(e.dtype))
    de = e.new_empty(e.shape if e_grad else (0, e.shape[1]))
    dc = c.new_empty(c.shape if c_grad else (0, c.shape[1]))
    db = (e if bias is None else bias).new_empty(c.shape[0] if bias_grad else 0)
    return loss, de, dc, db


linear_cross_entropy_fused_op = _library.define(
    "linear_cross_entropy_fused(Tensor e, Tensor c, Tensor? bias, Tensor targets, Tensor divisor, "
    "float? softcap, float label_smoothing, float z_loss, float? filter_eps, bool e_grad, "
    "bool c_grad, bool bias_grad) -> (Tensor, Tensor, Tensor, Tensor)",
    cpu=cpu.fused,
    reference=reference.fused,
    fake=_fake_fused,
)


def _setup_context(ctx, inputs, output) -> None:
    e, c, bias, targets, ctx.softcap, ctx.label_smoothing, ctx.z_loss, ctx.filter_eps = inputs
    ctx.save_for_backward(e, c, bias, targets, output[1])


def _backward(ctx, grad_row: torch.Tensor, grad_lse: torch.Tensor):
    e, c, bias, targets, lse = ctx.saved_tensors
    # The coefficients a, b, u of the module docstring.
    coef_softmax, coef_target, coef_uniform = reference.coefficients(
        grad_row, grad_lse, lse, targets >= 0, ctx.label_smoothing, ctx.z_loss, c.shape[0]
    )
    de, dc, dbias = _library.call(
        linear_cross_entropy_backward_op,
        e, c, bias, targets, lse, coef_softmax, coef_target, coef_uniform, ctx.softcap,
        ctx.filter_eps, bias is not None,
    )  # fmt: skip
    return de, dc, None if bias is None else dbias, None, None, None, None, None


_library.register_autograd(linear_cross_entropy_op, _backward, _setup_context)


def _setup_fused(ctx, inputs, output) -> None:
    ctx.flags = inputs[-3:]
    ctx.save_for_backward(*output[1:])
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)


def _eager(g: torch.Tensor) -> bool:
    return type(g) is torch.Tensor and g.is_cpu and not torch.compiler.is_compiling()


def _used_once(g: torch.Tensor) -> bool:
    """Whether this eager backward is the graph's last (no retain_graph): the saved gradients
    may then be scaled in place and handed over as they are (no copy of dC). A kept graph
    could otherwise meet them changed, e.g. by the accumulation into ``.grad``; traced graphs
    always copy."""
    keep = torch._C._autograd._get_current_graph_task_keep_graph()
    return _eager(g) and not (torch._C._len_torch_dispatch_stack() or keep)


def _backward_fused(ctx, grad_loss, *_):
    if grad_loss is None:  # the loss took no part in what is differentiated
        return (None,) * 12
    saved = ctx.saved_tensors
    if not _used_once(grad_loss):
        saved = [t * grad_loss for t in saved]
    elif grad_loss.item() != 1.0:  # (a plain loss.backward() has 1)
        for t in saved:
            t.mul_(grad_loss)
    return *(t if flag else None for t, flag in zip(saved, ctx.flags, strict=True)), *(None,) * 9


_library.register_autograd(linear_cross_entropy_fused_op, _backward_fused, _setup_fused)


def _check_inputs(e, c, targets, bias, autocast: bool) -> None:
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
        if name != "targets" and t.dtype != e.dtype and not autocast:
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
    eps = check_number(OP, "filter_eps", filter_eps, 0.0, 1.0)
    return None if eps == 0.0 or label_smoothing > 0 else eps


def _shifted_targets(targets: torch.Tensor, shift: int, ignore_index: int) -> torch.Tensor:
    """targets[..., shift:] padded at the end with ignore_index: row i of e then meets target
    i + shift, and e is used as it is (no copy of e[..., :-shift, :])."""
    if shift == 0:
        return targets
    pad = torch.full_like(targets[..., :shift], ignore_index)
    return torch.cat([targets[..., shift:], pad], dim=-1)


def _tokens(rows: torch.Tensor, shape: torch.Size, shift: int) -> torch.Tensor:
    """Per-row values over the token shape, without the ``shift`` padded positions."""
    rows = rows.view(shape)
    return rows[..., :-shift] if shift else rows


def _check_target_range(shifted: torch.Tensor, valid: torch.Tensor, vocab: int, ignore_index):
    """Eager only (it reads the data); in compiled graphs the CPU kernel refuses what it can."""
    if shifted.numel() == 0:
        return
    low, high = (int(x) for x in torch.aminmax(torch.where(valid, shifted, 0)))
    if low < 0 or high >= vocab:
        bad = int(shifted[valid & ((shifted < 0) | (shifted >= vocab))][0])
        raise ValueError(
            f"{OP}: targets must be in [0, {vocab}) or ignore_index ({ignore_index}), got {bad}"
        )


def _autocasting(e: object) -> bool:
    if not isinstance(e, torch.Tensor) or e.dtype == torch.float64:
        return False  # (the checks name a non-tensor e)
    return torch.is_autocast_enabled(e.device.type)


def _autocast(e, c, bias, fused: bool):
    """(e, c, bias, loss dtype) under autocast: the product in autocast's dtype, as the
    ``nn.Linear`` it replaces would run it, and the loss in float32, as autocast runs
    cross-entropy. Unchanged, with the loss in e's dtype, outside autocast and for float64
    (which autocast leaves alone too).

    Where the ``fused`` CPU pass will multiply in float32 anyway (torch's bfloat16 matmul is
    the slower one on this CPU: cpu.gemm_dtype), a float32 c and bias keep their dtype: rounding
    them to bfloat16 first would only cost precision and two V x D copies a step, the cast and
    its gradient's (about 70 ms of a 750 ms step of bench/model.py's Llama on the Xeon of
    family 6 model 207, mostly the page faults of the fresh copies)."""
    if not _autocasting(e):
        return e, c, bias, e.dtype
    dtype = torch.get_autocast_dtype(e.device.type)
    f32 = torch.float32
    keep = (
        fused
        and c.dtype == f32
        and (bias is None or bias.dtype == f32)
        and cpu.gemm_dtype(dtype) == f32
    )
    if not keep:
        c, bias = c.to(dtype), None if bias is None else bias.to(dtype)
    return e.to(dtype), c, bias, f32


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
    process_group: torch.distributed.ProcessGroup | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of the logits ``e @ c.T + bias`` against ``targets``, never materialized.

    e [..., D] (float32, bfloat16, float16 or float64), c [V, D] and bias [V] of e's dtype,
    targets [...] integer with e's leading shape. ``softcap`` caps the logits as
    softcap * tanh(z / softcap); ``label_smoothing`` as in ``F.cross_entropy``; ``z_loss`` adds
    z_loss * lse^2 per token; ``shift=k`` pairs e[..., :-k, :] with targets[..., k:];
    ``reduction`` "mean" divides by the number of non-ignored tokens (0 when there are none).
    Returns the loss in e's dtype, and with ``return_lse`` also lse over the (shifted) token
    shape. Under autocast (CPU or CUDA) e, c and bias are cast to autocast's dtype, as for the
    ``nn.Linear`` this replaces, and the loss and lse are float32, as autocast's cross-entropy.
    ``filter_eps`` ("auto": finfo(e.dtype).eps / 32; None or 0: off) lets the backward skip
    blocks of the logit gradient whose entries are all below it relative to their row's
    gradient scale; it is off whenever label smoothing is on. Gradients flow to e, c, bias and
    through lse.

    ``process_group``: vocabulary-parallel (parallel.py). c and bias hold this rank's
    contiguous shard of the vocabulary (any sizes), shards in rank order; e, targets (global
    ids) and the options are the same on every rank, and every rank gets the full loss and lse.
    The gradient of e is summed over the group (each rank's shard contributes its share), c's
    and bias's stay local. Each rank runs the chunk loop over its shard only; one all-gather
    of three numbers per row combines them. The ranks first agree on the options and inputs
    (one all_gather_object): a rank's bad input or a disagreement raises on every rank. A
    DTensor c sharded on dim 0 over a 1-D mesh (bias sharded alike) is the same call on its
    local shard over the mesh's group.
    """
    if process_group is None and parallel.is_dtensor(c):
        e, c, bias, process_group = parallel.local_shards(e, c, bias)
    shard = None
    if process_group is not None:  # before any check that could fail on one rank only
        options = (ignore_index, reduction, shift, softcap, label_smoothing, z_loss, return_lse)
        shard = parallel.agree(process_group, e, c, targets, bias, (*options, filter_eps))
    _check_inputs(e, c, targets, bias, _autocasting(e))
    ignore_index = as_int(OP, "ignore_index", ignore_index)
    if reduction not in REDUCTIONS:
        raise ValueError(f"{OP}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    shift = as_int(OP, "shift", shift)
    if shift and not 0 < shift <= (targets.shape[-1] if targets.dim() else 0):
        raise ValueError(
            f"{OP}: shift must be in [0, {targets.shape[-1] if targets.dim() else 0}] "
            f"(the length of targets' last dim), got {shift}"
        )
    if softcap is not None:
        softcap = check_number(OP, "softcap", softcap, 0.0)
        if softcap == 0.0 or softcap == math.inf:
            raise ValueError(f"{OP}: softcap must be a finite positive number, got {softcap}")
    label_smoothing = check_number(OP, "label_smoothing", label_smoothing, 0.0, 1.0)
    z_loss = check_number(OP, "z_loss", z_loss, 0.0)
    if z_loss == math.inf:
        raise ValueError(f"{OP}: z_loss must be finite, got inf")
    eps = _filter_eps(filter_eps, e.dtype, label_smoothing)

    grads = [t is not None and t.requires_grad for t in (e, c, bias)]
    fuse = shard is None and reduction != "none" and not return_lse and e.is_cpu
    fuse = fuse and torch.is_grad_enabled() and any(grads)  # the loss's gradient is known now
    e, c, bias, out_dtype = _autocast(e, c, bias, fuse)
    filtered = eps is not None and torch.is_grad_enabled() and any(grads[1:])
    exact = not (z_loss or return_lse or filtered or shard is not None)
    if small.fits(e, c, bias, targets, exact):
        options = (shift, ignore_index, softcap, reduction, label_smoothing)
        loss = small.loss(e, c, bias, targets, *options)
        if loss is not None:
            return loss.to(out_dtype)
    shifted = _shifted_targets(targets.long(), shift, ignore_index)
    valid = shifted != ignore_index
    if not torch.compiler.is_compiling():
        vocab = c.shape[0] if shard is None else shard.vocab
        _check_target_range(shifted, valid, vocab, ignore_index)
    flat_targets = torch.where(valid, shifted, -1).reshape(-1)
    args = (
        e.reshape(targets.numel(), e.shape[-1]).contiguous(),  # (-1 fails when D = 0)
        c.contiguous(),
        None if bias is None else bias.contiguous(),
        flat_targets,
    )
    if fuse:
        one = torch.ones((), dtype=torch.long)
        divisor = valid.sum().clamp(min=1) if reduction == "mean" else one
        options = (softcap, label_smoothing, z_loss, eps, *grads)
        loss = _library.call(linear_cross_entropy_fused_op, *args, divisor, *options)[0]
        return loss.to(out_dtype)
    row, lse = (_library.call if shard is None else shard.call)(
        linear_cross_entropy_op, *args, softcap, label_smoothing, z_loss, eps
    )
    # The rows past a shift are ignored (0), so sums need no slicing.
    if reduction == "none":
        loss = _tokens(row, targets.shape, shift)
    elif reduction == "sum":
        loss = row.sum()
    else:
        loss = row.sum() / valid.sum().clamp(min=1)
    loss = loss.to(out_dtype)
    return (loss, _tokens(lse, targets.shape, shift).to(out_dtype)) if return_lse else loss
