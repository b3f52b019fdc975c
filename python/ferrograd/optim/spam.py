"""SPAM / Stable-SPAM (rules in docs/definitions.md): the bookkeeping here, the fused step in
the op ``ferrograd::spam_step_many`` (ferrograd/ops/spam).

The optimizers compute each step's scalars (bias corrections, warm-up, clip thresholds, the
Stable-SPAM gradient statistics: one Rust pass over each gradient on CPU) and call the op once
per parameter group and device; the dispatcher runs the fused Rust pass on CPU float32 and
bfloat16 parameters (float32 moments; one parallel region over every tensor of a dtype) and
the same rule in torch ops on any other device or dtype (float64 parameters: float64 moments
and arithmetic).
Sparse momentum (``density < 1``, tensors with 2+ dims) keeps moments for exactly
``round(density * numel)`` coordinates drawn uniformly without replacement from a seeded
generator, redrawn at every reset, marked in a bitmask (state: 8 * density + 0.125 bytes per
parameter).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from ..ops._checks import check_int, check_number, compute_dtype
from ..ops._memory import last_level_cache_bytes
from ..ops.spam import adaclip_stats_many, mask_indices, sample_mask, spam_step_many

_GLOBAL = "spam"  # key of the optimizer-wide state (step, generator) in self.state
_MAX_FLOAT = 1.7976931348623157e308  # options must be finite


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2 parameters and gradients), else the tensor."""
    return t.to_local() if hasattr(t, "to_local") and hasattr(t, "device_mesh") else t


#: The largest int option or counter accepted (a 64-bit signed int).
_INT_MAX = 2**63 - 1


def _pair(betas: object) -> object:
    """betas as a tuple where it is a pair-like sequence; anything else is left for the group
    check to refuse with a clear message."""
    return tuple(betas) if isinstance(betas, (tuple, list)) else betas


class _SpamBase(torch.optim.Optimizer):
    _name = "SPAM"
    #: Per-parameter float statistics of the state (>= 0) besides the tensors.
    _stats: tuple[str, ...] = ()

    def __init__(self, params: Iterable, defaults: dict, seed: int) -> None:
        defaults.update(self._check_group(defaults))
        seed = check_int(self._name, "seed", seed, 0, 2**64 - 1)
        super().__init__(params, defaults)
        self.state[_GLOBAL] = {"step": 0, "rng": seed}

    def add_param_group(self, param_group: dict) -> None:
        """As torch's; a group's own options are checked as the defaults are."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group.update(self._check_group(group))
        for i, p in enumerate(group["params"]):
            # The step's real arithmetic would drop the imaginary parts.
            if p.is_complex():
                raise TypeError(
                    f"{self._name}: complex parameters are not supported, got params[{i}] of "
                    f"dtype {p.dtype}"
                )

    def _check_group(self, group: dict) -> dict:
        """ValueError / TypeError naming the option of ``group`` that is out of range; else
        the options as Python floats and ints (numpy scalars taken, as torch's optimizers do),
        which the optimizer's own groups then hold."""
        op = self._name
        out = {
            "lr": check_number(op, "lr", group["lr"], 0.0, _MAX_FLOAT),
            "eps": check_number(op, "eps", group["eps"], 0.0, _MAX_FLOAT),
        }
        # The step divides by sqrt(v_hat) + eps in float32: 0 / 0 where v is 0.
        if torch.tensor(out["eps"], dtype=torch.float32) == 0:
            raise ValueError(f"{op}: eps must be positive in float32 (>= 1e-45), got {out['eps']}")
        out["weight_decay"] = check_number(
            op, "weight_decay", group["weight_decay"], 0.0, _MAX_FLOAT
        )
        out["density"] = check_number(op, "density", group["density"], 0.0, 1.0)
        betas = group["betas"]
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise TypeError(f"{op}: betas must be a pair of floats")
        out["betas"] = tuple(
            check_number(op, f"betas[{i}]", b, 0.0, 1.0 - 1e-12) for i, b in enumerate(betas)
        )
        out["reset_interval"] = check_int(
            op, "reset_interval", group["reset_interval"], 1, _INT_MAX
        )
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, but keeps the moments float32 (float64 for float64 parameters) and the
        mask uint8 (torch would cast them to each parameter's dtype), and checks the state
        first: each parameter's moments (shape, dtype, v >= 0), mask (uint8 bitmask of exactly
        round(density * numel) bits, present exactly when the group is sparse), statistics and
        the step, raising ValueError naming the key before anything is loaded."""
        saved = {k: v for k, v in state_dict["state"].items() if isinstance(k, int)}
        self._check_state(state_dict, saved)
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for index, entries in saved.items():
            p = params[index]
            for key in ("mask", "exp_avg", "exp_avg_sq"):
                if key in entries:
                    # Contiguous copies: a saved tensor may be any view (a transposed moment).
                    value = entries[key].detach().to(p.device)
                    self.state[p][key] = value.clone(memory_format=torch.contiguous_format)

    def _check_state(self, state_dict: dict, saved: dict) -> None:
        op = f"{self._name}.load_state_dict"
        groups = state_dict.get("param_groups")
        ours = [p for group in self.param_groups for p in group["params"]]
        if not isinstance(groups, list) or sum(len(g["params"]) for g in groups) != len(ours):
            return  # torch's load_state_dict names the mismatch
        # Saved index -> (parameter, the saved group's options, which the load adopts).
        where = {}
        params = iter(ours)
        for i, group in enumerate(groups):
            try:
                self._check_group(group)
            except (TypeError, ValueError) as e:
                raise type(e)(f"{op}: param_groups[{i}]: {e}") from None
            for index in group["params"]:
                where[index] = (next(params), group)
        glob = state_dict["state"].get(_GLOBAL)
        if glob is not None:
            if not isinstance(glob, dict):
                raise ValueError(f"{op}: state[{_GLOBAL!r}] must be a dict")
            check_int(op, f"state[{_GLOBAL!r}]['step']", glob.get("step"), 0, _INT_MAX)
            check_int(op, f"state[{_GLOBAL!r}]['rng']", glob.get("rng"), 0, 2**64 - 1)
        for index, entries in saved.items():
            if index not in where:
                raise ValueError(f"{op}: state[{index}] names no parameter")
            p, group = where[index]
            self._check_entries(f"{op}: state[{index}]", p, group, entries)

    def _check_entries(self, name: str, p: torch.Tensor, group: dict, entries: dict) -> None:
        local = _local(p)
        sparse = group["density"] < 1.0 and p.dim() >= 2
        moments = [key for key in ("exp_avg", "exp_avg_sq") if key in entries]
        if not moments:
            if "mask" in entries:
                raise ValueError(f"{name}['mask'] comes without moments")
        elif len(moments) == 1:
            raise ValueError(f"{name} holds {moments[0]} without its pair")
        if moments:
            if sparse:
                k = round(group["density"] * local.numel())
                mask = entries.get("mask")
                bytes_ = -(-local.numel() // 8)
                if not isinstance(mask, torch.Tensor) or mask.dtype != torch.uint8:
                    got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
                    raise ValueError(
                        f"{name}['mask'] must be a uint8 bitmask (a sparse group, density "
                        f"{group['density']}), got {got}"
                    )
                if tuple(mask.shape) != (bytes_,):
                    raise ValueError(
                        f"{name}['mask'] must have shape [{bytes_}], got {list(mask.shape)}"
                    )
                count = mask_indices(mask.cpu(), local.numel()).numel()
                stray = int(mask[-1]) >> (local.numel() - 8 * (bytes_ - 1)) if bytes_ else 0
                if count != k or stray:
                    raise ValueError(
                        f"{name}['mask'] must mark exactly {k} of the {local.numel()} elements, "
                        f"got {count}{' and bits past the end' if stray else ''}"
                    )
                shape = (k,)
            else:
                if "mask" in entries:
                    raise ValueError(
                        f"{name}['mask'] found for a dense parameter (density "
                        f"{group['density']}, {p.dim()}-D)"
                    )
                shape = tuple(local.shape)
            dtype = compute_dtype(local.dtype)
            for key in moments:
                t = entries[key]
                if not isinstance(t, torch.Tensor) or t.dtype != dtype:
                    got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
                    want = str(dtype).removeprefix("torch.")
                    raise ValueError(f"{name}[{key!r}] must be a {want} tensor, got {got}")
                if tuple(t.shape) != shape:
                    raise ValueError(
                        f"{name}[{key!r}] must have shape {list(shape)}, got {list(t.shape)}"
                    )
            if not bool((entries["exp_avg_sq"] >= 0).all()):
                raise ValueError(f"{name}['exp_avg_sq'] must be >= 0 everywhere (no NaN)")
        for key in self._stats:
            if key in entries:
                value = entries[key]
                if not (
                    isinstance(value, (int, float))
                    and not isinstance(value, bool)
                    and 0 <= value < math.inf
                ):
                    raise ValueError(f"{name}[{key!r}] must be a finite float >= 0, got {value!r}")

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
        # float64 for float64 parameters, as torch's optimizers keep them; float32 else
        dtype = compute_dtype(p.dtype)
        state["exp_avg"] = torch.zeros(shape, dtype=dtype, device=p.device)
        state["exp_avg_sq"] = torch.zeros(shape, dtype=dtype, device=p.device)

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
            scalars = self._scalars(group, t)  # the same for every tensor of the group
            todo = []
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = self._grad(p)
                state = self.state[p]
                if "exp_avg" not in state or reset:
                    self._fresh_moments(p, group)
                todo.append((p, state, grad))
            self._update(todo, scalars)
        return loss

    def _update(self, todo: list[tuple], scalars: tuple) -> None:
        """The step of a group's tensors, ``todo`` holding (param, state, grad) each, with the
        group's ``_scalars`` (SPAM's: the op's shared ones)."""
        self._fused(todo, scalars, [(math.inf, 1.0, 1.0)] * len(todo))

    def _fused(self, todo: list[tuple], shared: tuple, per_tensor: list[tuple]) -> None:
        """One op call per device over the group's tensors (their local shards): ``shared``
        the scalars of ``spam_step_many`` from lr to spike_threshold, ``per_tensor`` each
        tensor's (AdaClip bound, ratio, AdaGN scale)."""
        by_device: dict[torch.device, list[int]] = {}
        for i, (p, _, _) in enumerate(todo):
            by_device.setdefault(p.device, []).append(i)
        for idx in by_device.values():
            states = [todo[i][1] for i in idx]
            spam_step_many(
                [_local(todo[i][0]) for i in idx], [_local(todo[i][2]) for i in idx],
                [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], *shared,
                adaclip_bounds=[per_tensor[i][0] for i in idx],
                adaclip_ratios=[per_tensor[i][1] for i in idx],
                grad_scales=[per_tensor[i][2] for i in idx],
                masks=[s.get("mask") for s in states],
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
            lr=lr, betas=_pair(betas), eps=eps, weight_decay=weight_decay, density=density,
            reset_interval=reset_interval, warmup_steps=warmup_steps, threshold=threshold,
            clip_warmup=clip_warmup,
        )  # fmt: skip
        super().__init__(params, defaults, seed)

    def _check_group(self, group: dict) -> dict:
        out = super()._check_group(group)
        out["threshold"] = check_number("SPAM", "threshold", group["threshold"], 0.0)
        if out["threshold"] == 0.0:  # inf is allowed: no spike clipping
            raise ValueError("SPAM: threshold must be positive (inf: no clipping), got 0.0")
        for name in ("warmup_steps", "clip_warmup"):
            out[name] = check_int("SPAM", name, group[name], 0, _INT_MAX)
        return out

    def _scalars(self, group: dict, t: int) -> tuple:
        """spam_step_many's shared scalars at step t: bias corrections, the warm-up after a
        reset, and the spike threshold once clip_warmup steps have passed."""
        interval, warmup_steps = group["reset_interval"], group["warmup_steps"]
        t0 = (t // interval) * interval  # step of the last reset, 0 before the first
        if t0 == 0 or warmup_steps == 0:  # no warm-up yet, or none at all
            warmup = 1.0
        else:
            s = min(t - t0, warmup_steps) / warmup_steps
            warmup = 1.0 - 0.99 * (1.0 + math.cos(math.pi * s)) / 2.0
        b1, b2 = group["betas"]
        clip = group["threshold"] if t - t0 >= group["clip_warmup"] else None
        return (
            group["lr"], group["weight_decay"], b1, b2, group["eps"], 1.0 - b1**t, 1.0 - b2**t,
            warmup, clip,
        )  # fmt: skip


class StableSPAM(_SpamBase):
    """Stable-SPAM: AdaClip and AdaGN on the gradient, Adam moments reset periodically (the
    bias-correction counter restarts at 1 on each reset), optional cosine scaling of beta1 and
    gamma1 from 1 to ``eta_min`` over ``total_steps``."""

    _name = "StableSPAM"
    _stats = ("max_abs", "norm_m", "norm_v")

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
        defaults = dict(
            lr=lr, betas=_pair(betas), eps=eps, weight_decay=weight_decay, gamma1=gamma1,
            gamma2=gamma2, gamma3=gamma3, reset_interval=reset_interval,
            total_steps=total_steps, eta_min=eta_min, density=density,
        )  # fmt: skip
        super().__init__(params, defaults, seed)

    def _check_group(self, group: dict) -> dict:
        out = super()._check_group(group)
        for name in ("gamma1", "gamma2", "gamma3"):
            out[name] = check_number("StableSPAM", name, group[name], 0.0, 1.0 - 1e-12)
        if group["total_steps"] is not None:
            out["total_steps"] = check_int(
                "StableSPAM", "total_steps", group["total_steps"], 1, _INT_MAX
            )
        out["eta_min"] = check_number("StableSPAM", "eta_min", group["eta_min"], 0.0, 1.0)
        return out

    def _scalars(self, group: dict, t: int) -> tuple:
        """(gammas, their bias corrections, eps, spam_step's scalars up to bias_correction2):
        beta1 and gamma1 on the cosine schedule, the moments' counter restarted at resets."""
        g1, g2, g3 = group["gamma1"], group["gamma2"], group["gamma3"]
        b1, b2 = group["betas"]
        if group["total_steps"] is not None:
            frac = min(t, group["total_steps"]) / group["total_steps"]
            c = group["eta_min"] + (1 - group["eta_min"]) * 0.5 * (1 + math.cos(math.pi * frac))
            b1, g1 = b1 * c, g1 * c
        interval = group["reset_interval"]
        k = t if t < interval else t - (t // interval) * interval + 1
        return (
            (g1, g2, g3), (1 - g1**t, 1 - g2**t, 1 - g3**t), group["eps"],
            (group["lr"], group["weight_decay"], b1, b2, group["eps"], 1.0 - b1**k, 1.0 - b2**k),
        )  # fmt: skip

    def _update(self, todo: list[tuple], scalars: tuple) -> None:
        (g1, g2, g3), (c1, c2, c3), eps, step = scalars
        for batch in _cache_batches(todo):
            # AdaClip: a running estimate of the largest |g| caps the entries above it; one
            # pass gives it and the clipped gradient's squared norm (AdaGN's input).
            grads = [_local(grad) for _, _, grad in batch]
            sharded = batch[0][2] is not grads[0]  # a shard comes alone
            max_abs = [None] * len(batch)
            if sharded:  # the max over every shard first (shards may be empty)
                local = grads[0]
                local_max = (
                    torch.linalg.vector_norm(local, ord=math.inf, dtype=torch.float64)
                    if local.numel()
                    else torch.zeros((), dtype=torch.float64, device=local.device)
                )
                max_abs[0] = _across_shards(batch[0][2], local_max, torch.distributed.ReduceOp.MAX)
            running = [state.get("max_abs", 0.0) for _, state, _ in batch]
            stats = adaclip_stats_many(grads, max_abs, running, g3, c3)
            per_tensor = []
            for (_, state, grad), (_, running_max, bound, ratio, squares) in zip(
                batch, stats, strict=True
            ):
                state["max_abs"] = running_max
                if sharded:
                    squares = _across_shards(
                        grad, torch.tensor(squares, dtype=torch.float64, device=grads[0].device),
                        torch.distributed.ReduceOp.SUM,
                    )  # fmt: skip
                norm = math.sqrt(squares)
                state["norm_m"] = g1 * state.get("norm_m", 0.0) + (1 - g1) * norm
                state["norm_v"] = g2 * state.get("norm_v", 0.0) + (1 - g2) * norm**2
                target = (state["norm_m"] / c1) / (math.sqrt(state["norm_v"] / c2) + eps)
                per_tensor.append((bound, ratio, target / norm if norm > 0 else 0.0))
            self._fused(batch, (*step, 1.0, None), per_tensor)


def _batch_bytes() -> int:
    """Gradient bytes per batch of Stable-SPAM's statistics-then-step: a quarter of the
    last-level cache, at least 8 MiB. A batch's gradients are read by the statistics pass and
    again by the step, which finds them in cache when they fit (on a 32 MiB L3, all statistics
    of a 29M-parameter Llama first, then one step, read them twice from memory: 3-7% slower
    than tensor by tensor); each batch costs a call of each (two parallel regions), which where
    the cache is large buys nothing (Xeon family 6 model 207, 260 MiB L3, the Llama's 38
    tensors: 8 MiB batches 20.6-21.3 ms a step, 65 MiB batches 19.9-20.3)."""
    return max(8 << 20, last_level_cache_bytes() // 4)


#: Overrides ``_batch_bytes()`` when set (None: the cache's size, read from sysfs at the first
#: step rather than at every ``import ferrograd``: about 80 us).
_BATCH_BYTES: int | None = None


def _cache_batches(todo: list[tuple]):
    """Runs of consecutive (param, state, grad) of ``todo`` holding up to ``_batch_bytes()`` of
    gradient (a larger one alone), a sharded gradient always alone (its statistics are
    all-reduced over its shards)."""
    limit = _batch_bytes() if _BATCH_BYTES is None else _BATCH_BYTES
    batch, size = [], 0
    for item in todo:
        grad = item[2]
        local = _local(grad)
        nbytes = local.numel() * local.element_size()
        if batch and (size + nbytes > limit or local is not grad):
            yield batch
            batch, size = [], 0
        batch.append(item)
        size += nbytes
        if local is not grad:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch
