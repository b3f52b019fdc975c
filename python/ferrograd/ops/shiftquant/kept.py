"""A weight's codes kept between calls: Q(W) and (once a backward needs it) Q(Wᵀ), each with
its GEMM packing (``weight_operand``), made again only when the weight changed.

ShiftQuantLinear keeps them on the layer in eager mode (nn/shiftquant.py). Under torch.compile
the layer cannot (a compiled graph does not run its Python between calls), so a call that wants
no gradient asks ``shiftquant_linear`` to use ``keep_codes``: the op's kernel, run by the
compiled graph at every call, finds the codes here, kept per weight tensor for as long as it
lives.
"""

from __future__ import annotations

import functools

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.weak import WeakIdKeyDictionary

#: Optimizer steps begun in this process, by any torch.optim.Optimizer: some steps write the
#: parameters without bumping their version counters (AdamW(fused=True), ferrograd's SPAM), so a
#: weight's kept codes are only trusted within one count.
_optimizer_steps = 0


def _count_step(optimizer, args, kwargs) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


register_optimizer_step_pre_hook(_count_step)


#: Elements of a CPU weight compared with the kept codes' at every call (about 2 us): they catch
#: rewrites of the weight that torch does not record.
_SAMPLES = 64


@functools.lru_cache(maxsize=64)
def _sample_index(numel: int) -> torch.Tensor:
    """Flat indices from 0 to numel - 1, evenly spaced (integer arithmetic: a float32
    linspace rounds numel - 1 up past the end from 2^24 elements on)."""
    k = min(numel, _SAMPLES)
    return torch.arange(k, dtype=torch.int64) * (numel - 1) // max(k - 1, 1)


def _sample(weight: torch.Tensor) -> torch.Tensor:
    """Elements spread evenly over the weight (in its logical order, any strides)."""
    return torch.take(weight.detach(), _sample_index(weight.numel()))


class WeightCodes:
    """Q(W) and Q(Wᵀ) of one weight (``weight_operand``'s lists; empty until made) and what
    they were made from: ``source`` keeps the weight's storage alive, so that no other tensor
    can take its address while ``key`` names it; ``sample`` holds some of its elements (CPU
    weights; None on other devices)."""

    __slots__ = ("key", "source", "sample", "forward", "transposed")

    def __init__(self, weight: torch.Tensor, key: tuple, sample: torch.Tensor | None) -> None:
        self.key, self.source, self.sample = key, weight.detach(), sample
        self.forward: list[torch.Tensor] = []
        self.transposed: list[torch.Tensor] = []

    def made_from(self, key: tuple, sample: torch.Tensor | None) -> bool:
        """Whether the codes are those of the weight with this key and (CPU) these sampled
        elements. Some writes move no version counter and may reuse the address:
        FSDP2 frees an unsharded weight after the forward and all-gathers it again into new
        memory, keeping its version counter, and the allocator often hands back the same
        address (a reloaded checkpoint then met the old codes); likewise DDP's broadcast and
        writes through ``weight.data``."""
        if key != self.key:
            return False
        return self.sample is None or torch.equal(sample, self.sample)


def can_keep(weight: torch.Tensor) -> bool:
    """Whether codes of ``weight`` can be kept: a plain 2-D CPU or CUDA tensor holding data."""
    return (
        type(weight) in (torch.Tensor, torch.nn.Parameter)
        and weight.dim() == 2
        and weight.numel() > 0
        and not weight.is_inference()
        and (weight.is_cpu or weight.is_cuda)
    )


def refresh(
    codes: WeightCodes | None,
    w: torch.Tensor,
    bits: int,
    group_size: int,
    transposed: bool,
    make,
) -> WeightCodes:
    """``codes`` if they are still those of the weight ``w`` at ``bits`` / ``group_size``, else
    new ones; Q(W) made where missing, and Q(Wᵀ) too with ``transposed``. ``make(w, bits,
    group_size, transposed=...)`` makes one (``weight_operand``)."""
    key = (
        w.data_ptr(),
        w._version,
        _optimizer_steps,
        w.dtype,
        w.device,
        w.shape,
        w.stride(),
        bits,
        group_size,
    )
    sample = _sample(w) if w.is_cpu else None
    if codes is None or not codes.made_from(key, sample):
        codes = WeightCodes(w, key, sample)
    if not codes.forward:
        codes.forward = make(w, bits, group_size)
    if transposed and not codes.transposed:
        codes.transposed = make(w, bits, group_size, transposed=True)
    return codes


#: weight tensor -> {(bits, group_size): its WeightCodes}, for ``keep_codes`` calls; an entry
#: goes with its weight.
_KEPT: WeakIdKeyDictionary = WeakIdKeyDictionary()


def forward_codes(weight: torch.Tensor, bits: int, group_size: int, make) -> list[torch.Tensor]:
    """Q(W) of ``weight`` as kept here for ``keep_codes`` calls (made where missing or stale)."""
    per_spec = _KEPT.setdefault(weight, {})
    codes = refresh(per_spec.get((bits, group_size)), weight, bits, group_size, False, make)
    per_spec[(bits, group_size)] = codes
    return codes.forward


def drop(weight: torch.Tensor) -> None:
    """Lets go of the codes kept here for ``weight``."""
    _KEPT.pop(weight, None)
