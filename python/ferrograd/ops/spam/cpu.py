"""The Rust fused step, AdaClip statistics and mask sampler on CPU tensors: float32 or bfloat16
parameters (gradient of the same dtype) with float32 moments run one fused pass; any other
dtype (float64 parameters) runs the reference."""

from __future__ import annotations

import torch

from ... import _core
from . import reference

#: Parameter dtypes of the Rust pass (moments float32).
_FUSED = (torch.float32, torch.bfloat16)


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
    fused = (
        param.dtype == grad.dtype
        and param.dtype in _FUSED
        and exp_avg.dtype == exp_avg_sq.dtype == torch.float32
        and param.is_contiguous()
        and exp_avg.is_contiguous()
        and exp_avg_sq.is_contiguous()
    )
    if not fused:
        reference.spam_step(
            param, grad, exp_avg, exp_avg_sq, lr, weight_decay, beta1, beta2, eps,
            bias_correction1, bias_correction2, warmup, spike_threshold, adaclip_bound,
            adaclip_ratio, grad_scale, mask,
        )  # fmt: skip
        return
    _core.spam_step(
        param, grad.contiguous(), exp_avg, exp_avg_sq, lr, weight_decay, (beta1, beta2), eps,
        (bias_correction1, bias_correction2), warmup, spike_threshold,
        (adaclip_bound, adaclip_ratio), grad_scale,
        None if mask is None else mask.contiguous(),
    )  # fmt: skip


def adaclip_stats(
    grad: torch.Tensor,
    max_abs: float | None,
    running_max: float,
    gamma3: float,
    correction: float,
) -> tuple[float, float, float, float, float]:
    if grad.dtype not in _FUSED:
        return reference.adaclip_stats(grad, max_abs, running_max, gamma3, correction)
    return _core.adaclip_stats(grad.contiguous(), max_abs, running_max, gamma3, correction)


def sample_mask(numel: int, k: int, rng_state: int) -> tuple[torch.Tensor, int]:
    """Exactly ``k`` of ``numel`` coordinates drawn uniformly without replacement, as a uint8
    bitmask (see :func:`reference.mask_indices`), and the advanced generator state."""
    mask, rng_state = _core.sample_mask(numel, k, rng_state)
    return torch.from_numpy(mask), rng_state
