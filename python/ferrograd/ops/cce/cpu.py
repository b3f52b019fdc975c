"""The CPU kernels: reference.py's chunk loop with the Rust chunk kernels (float32 logits, from
float32 / bfloat16 / float16 inputs); float64 runs the reference."""

from __future__ import annotations

import torch

from ... import _core
from . import reference


def _fold_chunk(z, v0, targets, lse, target_logit, logit_sum, softcap) -> None:
    _core.cce_forward_chunk(z, z.shape[1], v0, targets, lse, target_logit, logit_sum, softcap)


def _grad_chunk(z, v0, targets, lse, coefs, softcap) -> float:
    return _core.cce_backward_chunk(z, z.shape[1], v0, targets, lse, *coefs, softcap)


def forward(e, *args):
    """The op's arguments, as reference.forward's."""
    fold = reference.fold_chunk if e.dtype == torch.float64 else _fold_chunk
    return reference.forward(e, *args, fold=fold)


def backward(e, *args):
    """The op's arguments, as reference.backward's."""
    grad = reference.grad_chunk if e.dtype == torch.float64 else _grad_chunk
    return reference.backward(e, *args, grad=grad)
