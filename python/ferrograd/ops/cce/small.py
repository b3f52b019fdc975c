"""Small eager CPU calls: torch's own cross-entropy on materialized logits.

Where the logits are few (``fits``: at most ``LOGITS_BELOW`` of them, 1 MiB in float32),
writing them costs less than the op's call: the chunk loop, its autograd node and the
argument plumbing take about 90 us on a [8, 16] x [32, 16] loss that F.cross_entropy computes
in 8 (bench/overhead.py). Such calls run ``F.cross_entropy`` on ``e @ c.T + bias`` instead, in
the op's compute dtype (float32 for 16-bit inputs, float64 for float64), so the result and
its gradients follow the same definition (docs/definitions.md) to float32 rounding.
Only eager calls on plain CPU tensors come here: traced graphs (torch.compile, torch.export)
and tensor subclasses keep the ferrograd op.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .. import _library
from .._checks import as_dtype
from . import reference

#: Largest N * V served here: below it this path took 0.4-0.8x the op's time, at 2^19 logits
#: 0.94x, at 2^20 1.0x (docs/cce.md).
LOGITS_BELOW = 1 << 18

_NONE = contextlib.nullcontext()


def fits(
    e: torch.Tensor,
    c: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    exact: bool,
) -> bool:
    """Whether the call takes this path: small logits, an eager call on plain CPU tensors
    (``_library.eager_cpu``, the test the op's own call makes), and ``exact``: no z_loss or lse
    asked for (those need the op's per-row log-sum-exp) and no gradient filter that could skip
    dC / dbias entries (the op's filter leaves them exactly 0; here every gradient is the
    exact one)."""
    small = targets.numel() * c.shape[0] <= LOGITS_BELOW
    return exact and small and _library.eager_cpu((e, c, bias, targets))


def loss(
    e: torch.Tensor,
    c: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    shift: int,
    ignore_index: int,
    softcap: float | None,
    reduction: str,
    label_smoothing: float,
) -> torch.Tensor | None:
    """The loss per ``linear_cross_entropy``'s rules (checked arguments), in the compute dtype,
    or None where the op must answer: a row out of the loss (ignored, or none at all), whose
    NaN or inf the op keeps out of every gradient where torch's would spread it, and a target
    out of range (the op's check names it)."""
    if shift:
        e, targets = e[..., :-shift, :], targets[..., shift:]
    flat = targets.reshape(-1).long()
    if not flat.numel() or not bool((flat != ignore_index).all()):
        return None
    kd = reference.compute_dtype(e.dtype)
    # Under autocast the product would run in its dtype: it stays in kd.
    plain = torch.autocast("cpu", enabled=False) if torch.is_autocast_enabled("cpu") else _NONE
    with plain:
        z = F.linear(*(as_dtype(t, kd) for t in (e.reshape(flat.numel(), e.shape[-1]), c, bias)))
    if softcap is not None:
        z = torch.tanh(z / softcap) * softcap
    try:
        out = F.cross_entropy(z, flat, reduction=reduction, label_smoothing=label_smoothing)
    except IndexError:  # torch's "Target 7 is out of bounds"
        return None
    return out.view(targets.shape) if reduction == "none" else out
