"""The fused SPAM-family step in plain torch ops: the tests' oracle and the kernel of every
device and dtype the Rust pass does not take (CUDA, float64)."""

from __future__ import annotations

import math

import torch

from .._checks import compute_dtype


def mask_indices(mask: torch.Tensor, numel: int) -> torch.Tensor:
    """Sorted int64 flat indices of the set bits of a bitmask over ``numel`` elements (bit i of
    byte j, counted from the least significant, marks element 8j + i)."""
    shifts = torch.arange(8, dtype=torch.uint8, device=mask.device)
    bits = (mask.reshape(-1, 1) >> shifts) & 1
    return bits.view(-1)[:numel].nonzero().view(-1)


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
    """One step in place, the same rule as the Rust pass: AdaClip
    (entries above ``adaclip_bound`` scaled by ``adaclip_ratio``), ``grad_scale``, spike
    clipping to sqrt(spike_threshold * v), Adam moments, bias corrections, decoupled weight
    decay, step ``lr * warmup``. With ``mask`` the moments hold the marked coordinates only and
    the others get weight decay only. Float32 arithmetic, float64 for float64 parameters
    (whose moments the optimizers keep in float64): a float64 parameter is never rounded to
    float32."""
    p = param
    flat = p.view(-1) if p.is_contiguous() else p.reshape(-1)
    work = compute_dtype(p.dtype)
    g = grad.reshape(-1).to(work)
    p_work = flat.to(work)
    decay = 1.0 - lr * weight_decay
    idx = None if mask is None else mask_indices(mask, p.numel())
    if idx is not None:
        g, base = g[idx], p_work[idx]
    else:
        base = p_work
    if math.isfinite(adaclip_bound):
        g = torch.where(g.abs() > adaclip_bound, g * adaclip_ratio, g)
    g = g * grad_scale
    stored_m, stored_v = exp_avg.view(-1), exp_avg_sq.view(-1)
    m, v = stored_m.to(work), stored_v.to(work)  # the stored ones where they have that dtype
    if spike_threshold is not None:
        cap = (spike_threshold * v).sqrt()
        g = torch.minimum(torch.maximum(g, -cap), cap)
    m.mul_(beta1).add_(g * (1.0 - beta1))
    v.mul_(beta2).add_(g * (1.0 - beta2) * g)
    if m is not stored_m:
        stored_m.copy_(m)
        stored_v.copy_(v)
    inv1, inv2 = 1.0 / bias_correction1, 1.0 / bias_correction2  # as the Rust pass does
    update = (m * inv1) / ((v * inv2).sqrt() + eps)
    new = base * decay - (lr * warmup) * update
    if idx is not None:
        p_work = p_work * decay
        p_work[idx] = new
        new = p_work
    flat.copy_(new.to(p.dtype))
    if not p.is_contiguous():
        p.copy_(flat.view_as(p))


def spam_step_many(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    *args: float | None | list[float] | list[torch.Tensor | None],
) -> None:
    """:func:`spam_step` on every tensor of the lists, its AdaClip bound and ratio, AdaGN
    scale and mask taken from the per-tensor lists (the last four arguments)."""
    *shared, bounds, ratios, scales, masks = args
    each = zip(params, grads, exp_avgs, exp_avg_sqs, bounds, ratios, scales, masks, strict=True)
    for p, g, m, v, bound, ratio, scale, mask in each:
        spam_step(p, g, m, v, *shared, bound, ratio, scale, mask)


def adaclip_stats(
    grad: torch.Tensor,
    max_abs: float | None,
    running_max: float,
    gamma3: float,
    correction: float,
) -> tuple[float, float, float, float, float]:
    """Stable-SPAM's AdaClip on ``grad`` (float32 arithmetic, float64 for float64 gradients;
    sums in float64): returns (max |g| (``max_abs`` when given: the max over every shard), the
    new running max, the bound, the ratio applied above it, the sum of squares of the clipped
    gradient)."""
    g = grad.reshape(-1).to(compute_dtype(grad.dtype))
    if max_abs is None:
        max_abs = float(g.abs().max()) if g.numel() else 0.0
    running = gamma3 * running_max + (1 - gamma3) * max_abs
    bound = running / correction
    ratio = bound / max_abs if max_abs > 0 else 1.0
    clipped = torch.where(g.abs() > bound, g * ratio, g)
    sum_sq = float(torch.linalg.vector_norm(clipped, dtype=torch.float64) ** 2)
    return max_abs, running, bound, ratio, sum_sq


def adaclip_stats_many(
    grads: list[torch.Tensor],
    max_abs: list[float | None],
    running_maxes: list[float],
    gamma3: float,
    correction: float,
) -> list[tuple[float, float, float, float, float]]:
    """:func:`adaclip_stats` of each gradient."""
    each = zip(grads, max_abs, running_maxes, strict=True)
    return [adaclip_stats(g, m, r, gamma3, correction) for g, m, r in each]
