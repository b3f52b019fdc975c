"""SPAM / Stable-SPAM (rules in docs/definitions.md): the bookkeeping here, the fused step in
the op ``ferrograd::spam_step`` (ferrograd/ops/spam).

The optimizers compute each step's scalars (bias corrections, warm-up, clip thresholds, the
Stable-SPAM gradient statistics) and call the op once per parameter tensor; the dispatcher runs
the fused Rust pass on CPU float32 tensors and the same rule in torch ops on any other device
or dtype. Sparse momentum (``density < 1``, tensors with 2+ dims) keeps moments for exactly
``round(density * numel)`` coordinates drawn uniformly without replacement from a seeded
generator, redrawn at every reset, marked in a bitmask (state: 8 * density + 0.125 bytes per
parameter).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from ..ops.spam import mask_indices, sample_mask, spam_step

_GLOBAL = "spam"  # key of the optimizer-wide state (step, generator) in self.state


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2 parameters and gradients), else the tensor."""
    return t.to_local() if hasattr(t, "to_local") and hasattr(t, "device_mesh") else t


def _check(op: str, name: str, value: float, low: float, high: float = math.inf) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be a number, got {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{op}: {name} must be in [{low}, {high}], got {value}")


class _SpamBase(torch.optim.Optimizer):
    _name = "SPAM"

    def __init__(self, params: Iterable, defaults: dict, seed: int) -> None:
        op = self._name
        _check(op, "lr", defaults["lr"], 0.0)
        _check(op, "eps", defaults["eps"], 0.0)
        _check(op, "weight_decay", defaults["weight_decay"], 0.0)
        _check(op, "density", defaults["density"], 0.0, 1.0)
        betas = defaults["betas"]
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise TypeError(f"{op}: betas must be a pair of floats")
        for i, b in enumerate(betas):
            _check(op, f"betas[{i}]", b, 0.0, 1.0 - 1e-12)
        if isinstance(defaults["reset_interval"], bool) or defaults["reset_interval"] < 1:
            raise ValueError(f"{op}: reset_interval must be a positive int")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"{op}: seed must be a non-negative int, got {seed!r}")
        super().__init__(params, defaults)
        self.state[_GLOBAL] = {"step": 0, "rng": seed}

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, but keeps the moments float32 and the mask uint8 (torch would cast them
        to each parameter's dtype)."""
        saved = {k: v for k, v in state_dict["state"].items() if isinstance(k, int)}
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for index, entries in saved.items():
            p = params[index]
            for key in ("mask", "exp_avg", "exp_avg_sq"):
                if key in entries:
                    self.state[p][key] = entries[key].detach().clone().to(p.device)

    # -- bookkeeping -------------------------------------------------------------------------

    def _sparse(self, p: torch.Tensor, group: dict) -> bool:
        return group["density"] < 1.0 and p.dim() >= 2

    def _draw_mask(self, p: torch.Tensor, k: int) -> torch.Tensor:
        """Exactly ``k`` of ``p``'s coordinates, as a bitmask, from the optimizer's generator."""
        mask, self.state[_GLOBAL]["rng"] = sample_mask(p.numel(), k, self.state[_GLOBAL]["rng"])
        return mask.to(p.device)

    def _fresh_moments(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        sparse = self._sparse(p, group)
        p = _local(p)
        if sparse:
            k = round(group["density"] * p.numel())
            state["mask"] = self._draw_mask(p, k)
            shape = (k,)
        else:
            state.pop("mask", None)
            shape = p.shape
        state["exp_avg"] = torch.zeros(shape, dtype=torch.float32, device=p.device)
        state["exp_avg_sq"] = torch.zeros(shape, dtype=torch.float32, device=p.device)

    def active_indices(self, p: torch.Tensor) -> torch.Tensor:
        """Sorted int64 flat indices of ``p`` that carry momentum (all of them when dense);
        for a DTensor, indices into this rank's local shard."""
        state = self.state.get(p)
        if state is None or "exp_avg" not in state:
            group = next((g for g in self.param_groups if any(q is p for q in g["params"])), None)
            if group is None:
                raise ValueError(f"{self._name}.active_indices: p is not optimized here")
            if self._sparse(p, group):
                raise ValueError(
                    f"{self._name}.active_indices: p has no mask yet (drawn at its first step)"
                )
            return torch.arange(_local(p).numel(), device=p.device)
        local = _local(p)
        if "mask" not in state:
            return torch.arange(local.numel(), device=local.device)
        return mask_indices(state["mask"], local.numel())

    def _grad(self, p: torch.Tensor) -> torch.Tensor:
        if p.grad.is_sparse:
            raise RuntimeError(f"{self._name} does not support sparse gradients")
        return p.grad

    # -- the update ----------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        glob = self.state[_GLOBAL]
        glob["step"] += 1
        t = glob["step"]
        for group in self.param_groups:
            reset = t % group["reset_interval"] == 0
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = self._grad(p)
                if "exp_avg" not in self.state[p] or reset:
                    self._fresh_moments(p, group)
                self._update(p, grad, group, t)
        return loss

    def _fused(
        self,
        p: torch.Tensor,
        grad: torch.Tensor,
        *,
        lr: float,
        weight_decay: float,
        betas: tuple[float, float],
        eps: float,
        bias_corrections: tuple[float, float],
        warmup: float = 1.0,
        spike_threshold: float | None = None,
        adaclip: tuple[float, float] = (math.inf, 1.0),
        grad_scale: float = 1.0,
    ) -> None:
        """One step of the rule on ``p``'s local tensor (ferrograd/ops/spam has the scalars)."""
        state = self.state[p]
        spam_step(
            _local(p), _local(grad), state["exp_avg"], state["exp_avg_sq"], lr, weight_decay,
            *betas, eps, *bias_corrections, warmup, spike_threshold, *adaclip, grad_scale,
            mask=state.get("mask"),
        )  # fmt: skip


def _across_shards(t: torch.Tensor, value: torch.Tensor, op) -> float:
    """``value`` (a local statistic of ``t``) reduced over the shards of a DTensor ``t``."""
    if t is not _local(t):
        value = value.clone()
        torch.distributed.all_reduce(value, op=op, group=t.device_mesh.get_group())
    return float(value)


class SPAM(_SpamBase):
    """Spike-aware Adam with momentum reset (weight decay decoupled)."""

    _name = "SPAM"

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        *,
        density: float = 1.0,
        reset_interval: int = 500,
        warmup_steps: int = 150,
        threshold: float = 5000.0,
        clip_warmup: int = 20,
        seed: int = 0,
    ) -> None:
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, density=density,
            reset_interval=reset_interval, warmup_steps=warmup_steps, threshold=threshold,
            clip_warmup=clip_warmup,
        )  # fmt: skip
        _check("SPAM", "threshold", threshold, 0.0)
        super().__init__(params, defaults, seed)

    def _update(self, p: torch.Tensor, grad: torch.Tensor, group: dict, t: int) -> None:
        interval, warmup_steps = group["reset_interval"], group["warmup_steps"]
        t0 = (t // interval) * interval  # step of the last reset, 0 before the first
        if t0 == 0:
            warmup = 1.0
        else:
            s = min(t - t0, warmup_steps) / max(warmup_steps, 1)
            warmup = 1.0 - 0.99 * (1.0 + math.cos(math.pi * s)) / 2.0
        b1, b2 = group["betas"]
        clip = group["threshold"] if t - t0 >= group["clip_warmup"] else None
        self._fused(
            p, grad,
            lr=group["lr"], weight_decay=group["weight_decay"], betas=(b1, b2),
            eps=group["eps"], bias_corrections=(1.0 - b1**t, 1.0 - b2**t),
            warmup=warmup, spike_threshold=clip,
        )  # fmt: skip


class StableSPAM(_SpamBase):
    """Stable-SPAM: AdaClip and AdaGN on the gradient, Adam moments reset periodically (the
    bias-correction counter restarts at 1 on each reset), optional cosine scaling of beta1 and
    gamma1 from 1 to ``eta_min`` over ``total_steps``."""

    _name = "StableSPAM"

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        gamma1: float = 0.7,
        gamma2: float = 0.9,
        gamma3: float = 0.999,
        reset_interval: int = 500,
        total_steps: int | None = None,
        eta_min: float = 0.5,
        density: float = 1.0,
        seed: int = 0,
    ) -> None:
        for name, value in (("gamma1", gamma1), ("gamma2", gamma2), ("gamma3", gamma3)):
            _check("StableSPAM", name, value, 0.0, 1.0 - 1e-12)
        if total_steps is not None and (isinstance(total_steps, bool) or total_steps < 1):
            raise ValueError("StableSPAM: total_steps must be a positive int or None")
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, gamma1=gamma1,
            gamma2=gamma2, gamma3=gamma3, reset_interval=reset_interval,
            total_steps=total_steps, eta_min=eta_min, density=density,
        )  # fmt: skip
        super().__init__(params, defaults, seed)

    def _update(self, p: torch.Tensor, grad: torch.Tensor, group: dict, t: int) -> None:
        state = self.state[p]
        g1, g2, g3 = group["gamma1"], group["gamma2"], group["gamma3"]
        b1, b2 = group["betas"]
        if group["total_steps"] is not None:
            frac = min(t, group["total_steps"]) / group["total_steps"]
            c = group["eta_min"] + (1 - group["eta_min"]) * 0.5 * (1 + math.cos(math.pi * frac))
            b1, g1 = b1 * c, g1 * c
        # AdaClip: a running estimate of the largest |g| caps the entries above it.
        local = _local(grad)
        local_max = (
            local.abs().max().double() if local.numel() else torch.zeros((), dtype=torch.float64)
        )
        gmax = _across_shards(
            grad, local_max, torch.distributed.ReduceOp.MAX
        )  # shards may be empty
        state["max_abs"] = g3 * state.get("max_abs", 0.0) + (1 - g3) * gmax
        bound = state["max_abs"] / (1 - g3**t)
        ratio = bound / gmax if gmax > 0 else 1.0
        clipped = torch.where(local.abs() > bound, local * ratio, local)
        # AdaGN: the gradient norm normalized by its running moments.
        squares = torch.linalg.vector_norm(clipped, dtype=torch.float64) ** 2
        norm = math.sqrt(_across_shards(grad, squares, torch.distributed.ReduceOp.SUM))
        state["norm_m"] = g1 * state.get("norm_m", 0.0) + (1 - g1) * norm
        state["norm_v"] = g2 * state.get("norm_v", 0.0) + (1 - g2) * norm**2
        target = (state["norm_m"] / (1 - g1**t)) / (
            math.sqrt(state["norm_v"] / (1 - g2**t)) + group["eps"]
        )
        scale = target / norm if norm > 0 else 0.0
        interval = group["reset_interval"]
        k = t if t < interval else t - (t // interval) * interval + 1
        self._fused(
            p, grad,
            lr=group["lr"], weight_decay=group["weight_decay"], betas=(b1, b2),
            eps=group["eps"], bias_corrections=(1.0 - b1**k, 1.0 - b2**k),
            adaclip=(bound, ratio), grad_scale=scale,
        )  # fmt: skip
