"""The Rust fused step, AdaClip statistics and mask sampler on CPU tensors: float32 or bfloat16
parameters (gradient of the same dtype) with float32 moments run one fused pass; any other
dtype (float64 parameters) runs the reference."""

from __future__ import annotations

import torch

from ... import _core
from . import reference

#: Parameter dtypes of the Rust pass (moments float32).
_FUSED = (torch.float32, torch.bfloat16)


def _fused(param, grad, exp_avg, exp_avg_sq) -> bool:
    """Whether the Rust pass takes this tensor's step (else the reference does)."""
    return (
        param.dtype == grad.dtype
        and param.dtype in _FUSED
        and exp_avg.dtype == exp_avg_sq.dtype == torch.float32
        and param.is_contiguous()
        and exp_avg.is_contiguous()
        and exp_avg_sq.is_contiguous()
    )


def spam_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    lr: float,
    weight_decay: float,
    beta1: float,
    beta2: float,
    eps: float,
    bias_correction1: float,
    bias_correction2: float,
    warmup: float,
    spike_threshold: float | None,
    adaclip_bound: float,
    adaclip_ratio: float,
    grad_scale: float,
    mask: torch.Tensor | None = None,
) -> None:
    if not _fused(param, grad, exp_avg, exp_avg_sq):
        reference.spam_step(
            param, grad, exp_avg, exp_avg_sq, lr, weight_decay, beta1, beta2, eps,
            bias_correction1, bias_correction2, warmup, spike_threshold, adaclip_bound,
            adaclip_ratio, grad_scale, mask,
        )  # fmt: skip
        return
    _core.spam_step(
        param, grad.contiguous(), exp_avg, exp_avg_sq, lr, weight_decay, (beta1, beta2), eps,
        (bias_correction1, bias_correction2), warmup, spike_threshold,
        (adaclip_bound, adaclip_ratio), grad_scale, None if mask is None else mask.contiguous(),
    )  # fmt: skip


def spam_step_many(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    lr: float,
    weight_decay: float,
    beta1: float,
    beta2: float,
    eps: float,
    bias_correction1: float,
    bias_correction2: float,
    warmup: float,
    spike_threshold: float | None,
    adaclip_bounds: list[float],
    adaclip_ratios: list[float],
    grad_scales: list[float],
    masks: list[torch.Tensor | None],
) -> None:
    """One Rust call per parameter dtype (float32, bfloat16) over the tensors it takes; the
    reference steps the others one by one."""
    per_tensor = (adaclip_bounds, adaclip_ratios, grad_scales, masks)
    shared = (lr, weight_decay, beta1, beta2, eps, bias_correction1, bias_correction2, warmup,
              spike_threshold)  # fmt: skip
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, tensors in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, strict=True)):
        if _fused(*tensors):
            by_dtype.setdefault(tensors[0].dtype, []).append(i)
        else:
            reference.spam_step(*tensors, *shared, *(t[i] for t in per_tensor))
    for idx in by_dtype.values():
        masks_i = [None if masks[i] is None else masks[i].contiguous() for i in idx]
        _core.spam_step_many(
            [params[i] for i in idx], [grads[i].contiguous() for i in idx],
            [exp_avgs[i] for i in idx], [exp_avg_sqs[i] for i in idx], lr, weight_decay,
            (beta1, beta2), eps, (bias_correction1, bias_correction2), warmup, spike_threshold,
            [(adaclip_bounds[i], adaclip_ratios[i]) for i in idx], [grad_scales[i] for i in idx],
            masks_i,
        )  # fmt: skip


def adaclip_stats_many(
    grads: list[torch.Tensor],
    max_abs: list[float | None],
    running_maxes: list[float],
    gamma3: float,
    correction: float,
) -> list[tuple[float, float, float, float, float]]:
    """One Rust call per gradient dtype (float32, bfloat16) over the gradients it takes; the
    reference takes the others one by one."""
    out: list = [None] * len(grads)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, g in enumerate(grads):
        if g.dtype in _FUSED:
            by_dtype.setdefault(g.dtype, []).append(i)
        else:
            out[i] = reference.adaclip_stats(g, max_abs[i], running_maxes[i], gamma3, correction)
    for idx in by_dtype.values():
        stats = _core.adaclip_stats_many(
            [grads[i].contiguous() for i in idx], [max_abs[i] for i in idx],
            [running_maxes[i] for i in idx], gamma3, correction,
        )  # fmt: skip
        for i, s in zip(idx, stats, strict=True):
            out[i] = s
    return out


def sample_mask(numel: int, k: int, rng_state: int) -> tuple[torch.Tensor, int]:
    """Exactly ``k`` of ``numel`` coordinates drawn uniformly without replacement, as a uint8
    bitmask (see :func:`reference.mask_indices`), and the advanced generator state."""
    mask, rng_state = _core.sample_mask(numel, k, rng_state)
    return torch.from_numpy(mask), rng_state
