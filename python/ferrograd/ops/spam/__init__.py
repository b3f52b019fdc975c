"""The fused SPAM / Stable-SPAM step as the mutating op ``ferrograd::spam_step``.

The op updates ``param``, ``exp_avg`` and ``exp_avg_sq`` in place (declared in its schema, so
torch.compile functionalizes it) and returns nothing. float32 and bfloat16 CPU parameters (with
float32 moments) run one fused Rust pass (cpu.py); every other device and dtype runs the same
rule in torch ops (reference.py). ``adaclip_stats`` gives Stable-SPAM's per-tensor gradient
statistics (one Rust pass on CPU).
``ferrograd::spam_step_many`` is the same step over lists of tensors (the scalars shared but
AdaClip's bound and ratio and AdaGN's scale, per tensor): on CPU one Rust call per parameter
dtype, one parallel region over every tensor's parts. The optimizers in ``ferrograd.optim``
compute the scalars (bias corrections, warm-up factor, clip thresholds) and call it once per
parameter group. ``mask`` (uint8, one bit per element of ``param``) selects sparse momentum:
the moments then hold only the marked coordinates, in order, and the others get weight decay
only.
"""

from __future__ import annotations

import torch

from .. import _library
from . import cpu, reference
from .cpu import sample_mask
from .reference import mask_indices

__all__ = [
    "adaclip_stats",
    "adaclip_stats_many",
    "mask_indices",
    "sample_mask",
    "spam_step",
    "spam_step_many",
    "spam_step_op",
]


def _fake(param: torch.Tensor, *args) -> None:
    return None


_SCALARS = (
    "float lr, float weight_decay, float beta1, float beta2, float eps, "
    "float bias_correction1, float bias_correction2, float warmup, float? spike_threshold, "
)
spam_step_op = _library.define(
    "spam_step(Tensor(a!) param, Tensor grad, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, "
    + _SCALARS
    + "float adaclip_bound, float adaclip_ratio, float grad_scale, Tensor? mask=None) -> ()",
    cpu=cpu.spam_step,
    reference=reference.spam_step,
    fake=_fake,
)


spam_step_many_op = _library.define(
    "spam_step_many(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
    "Tensor(c!)[] exp_avg_sqs, " + _SCALARS + "float[] adaclip_bounds, float[] adaclip_ratios, "
    "float[] grad_scales, Tensor?[] masks) -> ()",
    cpu=cpu.spam_step_many,
    reference=reference.spam_step_many,
    fake=_fake,
)


def spam_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *scalars: float | None,
    mask: torch.Tensor | None = None,
) -> None:
    """One fused step in place: ``ferrograd::spam_step`` with the scalars in schema order."""
    _library.call(spam_step_op, param, grad, exp_avg, exp_avg_sq, *scalars, mask)


def spam_step_many(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    *scalars: float | None,
    adaclip_bounds: list[float],
    adaclip_ratios: list[float],
    grad_scales: list[float],
    masks: list[torch.Tensor | None],
) -> None:
    """``spam_step`` on every tensor of the lists in one op (``ferrograd::spam_step_many``):
    ``scalars`` in the schema's order from lr to spike_threshold, shared; the rest one entry
    per parameter."""
    lists = {"grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs,
             "adaclip_bounds": adaclip_bounds, "adaclip_ratios": adaclip_ratios,
             "grad_scales": grad_scales, "masks": masks}  # fmt: skip
    for name, values in lists.items():
        if len(values) != len(params):
            raise ValueError(
                f"spam_step_many: {name} has {len(values)} entries for {len(params)} params"
            )
    if params:
        _library.call(
            spam_step_many_op, params, grads, exp_avgs, exp_avg_sqs, *scalars, adaclip_bounds,
            adaclip_ratios, grad_scales, masks,
        )  # fmt: skip


def adaclip_stats(
    grad: torch.Tensor,
    max_abs: float | None,
    running_max: float,
    gamma3: float,
    correction: float,
) -> tuple[float, float, float, float, float]:
    """Stable-SPAM's AdaClip statistics of ``grad``: (max |g|, new running max ``gamma3 *
    running_max + (1 - gamma3) * max|g|``, bound ``running / correction``, ratio ``bound / max
    |g|`` applied to the entries above the bound, sum of squares of the clipped gradient).
    ``max_abs`` replaces max |g| when given (a sharded gradient's global max)."""
    return adaclip_stats_many([grad], [max_abs], [running_max], gamma3, correction)[0]


def adaclip_stats_many(
    grads: list[torch.Tensor],
    max_abs: list[float | None],
    running_maxes: list[float],
    gamma3: float,
    correction: float,
) -> list[tuple[float, float, float, float, float]]:
    """:func:`adaclip_stats` of every gradient of ``grads`` (with its ``max_abs`` and running
    max): on CPU one Rust call per dtype, its chunks in one parallel region."""
    if not len(grads) == len(max_abs) == len(running_maxes):
        raise ValueError(
            f"adaclip_stats: max_abs and running_maxes must hold one entry per gradient "
            f"({len(grads)}), got {len(max_abs)} and {len(running_maxes)}"
        )
    if all(g.device.type == "cpu" for g in grads):
        return cpu.adaclip_stats_many(grads, max_abs, running_maxes, gamma3, correction)
    out = []  # other devices: one gradient at a time, in torch ops
    for g, m, r in zip(grads, max_abs, running_maxes, strict=True):
        kernel = cpu.adaclip_stats_many if g.device.type == "cpu" else reference.adaclip_stats_many
        out += kernel([g], [m], [r], gamma3, correction)
    return out
