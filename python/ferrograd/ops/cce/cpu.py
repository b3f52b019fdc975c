"""The CPU kernels: reference.py's chunk loops (forward, recomputing backward, fused) with the
Rust row kernels (rust/cce.rs) in place of the torch ones; float64 runs the reference.

bfloat16 inputs multiply in bfloat16 where torch's bfloat16 matmul is the faster one on this CPU
(ops/_matmul.py measures it), as a bfloat16 ``nn.Linear`` would; the Rust kernels read the
bfloat16 logits as the matmul wrote them (no float32 copy) and write the logit gradient back in
bfloat16 for the gradient matmuls; the log-sum-exp, the gradient and every sum over chunks stay
float32. Elsewhere, and for float16 (no native CPU matmul on most CPUs), the chunks are upcast
to float32.
"""

from __future__ import annotations

import torch

from ... import _core
from .._matmul import bf16_matmul_is_faster
from . import reference


def gemm_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the chunk matmuls run in for inputs of ``dtype``."""
    if dtype == torch.bfloat16 and bf16_matmul_is_faster():
        return torch.bfloat16
    return reference.compute_dtype(dtype)


def _fold_chunk(z, v0, targets, lse, target_logit, logit_sum, softcap) -> None:
    _core.cce_forward_chunk(z, z.shape[1], v0, targets, lse, target_logit, logit_sum, softcap)


def _grad_chunk(z, v0, targets, lse, coefs, softcap) -> float:
    return _core.cce_backward_chunk(z, z.shape[1], v0, targets, lse, *coefs, softcap)


def _fused_rows(z, targets, lse, target_logit, logit_sum, peaks, piece, scale, *options):
    softcap, label_smoothing, z_loss = options
    _core.cce_loss_grad_rows(
        z, z.shape[1], targets, lse, target_logit, logit_sum, peaks, piece, scale,
        label_smoothing, z_loss, softcap,
    )  # fmt: skip


def _kernels(dtype: torch.dtype) -> dict:
    """The chunk loop's options for inputs of ``dtype``: the matmul dtype, whose output the
    Rust kernels read as it is."""
    return {"gemm_dtype": gemm_dtype(dtype), "native": True}


def _check(op: str, e, c, bias, targets) -> None:
    """The shapes the chunk loop assumes (the public function checks them first; the ops
    themselves raised torch's matmul and broadcast errors, naming neither op nor argument)."""
    if e.dim() != 2 or c.dim() != 2 or e.shape[1] != c.shape[1]:
        raise ValueError(
            f"{op}: e [N, D] and c [V, D] must share D, got {tuple(e.shape)} and {tuple(c.shape)}"
        )
    if targets.shape != (e.shape[0],):
        raise ValueError(
            f"{op}: targets must have shape [{e.shape[0]}], got {tuple(targets.shape)}"
        )
    if bias is not None and bias.shape != (c.shape[0],):
        raise ValueError(f"{op}: bias must have shape [{c.shape[0]}], got {tuple(bias.shape)}")


def forward(e, *args):
    """The op's arguments, as reference.forward's."""
    _check("linear_cross_entropy", e, *args[:3])
    if e.dtype == torch.float64:
        return reference.forward(e, *args)
    return reference.forward(e, *args, fold=_fold_chunk, **_kernels(e.dtype))


def backward(e, *args):
    """The op's arguments, as reference.backward's."""
    _check("linear_cross_entropy_backward", e, *args[:3])
    if e.dtype == torch.float64:
        return reference.backward(e, *args)
    return reference.backward(e, *args, grad=_grad_chunk, **_kernels(e.dtype))


def fused(e, *args):
    """The op's arguments, as reference.fused's."""
    _check("linear_cross_entropy_fused", e, *args[:3])
    if e.dtype == torch.float64:
        return reference.fused(e, *args)
    return reference.fused(e, *args, rows_fn=_fused_rows, **_kernels(e.dtype))


def parts(e, *args):
    """reference.parts' arguments, run as :func:`forward` runs the chunk loop."""
    _check("linear_cross_entropy_parts", e, *args[:3])
    if e.dtype == torch.float64:
        return reference.parts(e, *args)
    return reference.parts(e, *args, fold=_fold_chunk, **_kernels(e.dtype))
