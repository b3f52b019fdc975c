"""ShiftQuantLinear and quantize_model: sub-8-bit integer training of a model's linears."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..ops._checks import check_int
from ..ops.shiftquant import check_spec, kept, linear_with_codes, weight_operand
from ._own import own
from ._swap import frozen_as, plain_parameters
from .l1norm import L1LayerNorm


class ShiftQuantLinear(nn.Module):
    """nn.Linear whose forward and backward GEMMs run on ShiftQuant integer codes.

    Activations and weights are rounded to nearest at ``bits``; the output gradient is rounded
    stochastically at ``grad_bits`` (default: ``bits``). The parameters stay float32 (the
    optimizer updates them as usual); only the GEMM operands are quantized.

    The weight's codes, packed for the GEMM, can be kept between calls while the weight is
    unchanged (``cache_weight_codes``): about 2 bytes per weight element for the forward's, 4
    once a backward has run. By default (None) a CPU layer keeps the forward's codes for calls
    that want no gradient (``torch.no_grad()``, ``generate()``, a frozen layer fed an input
    without one), so that evaluation and decoding quantize each weight once rather than at
    every token, and lets them go at the first call that trains. ``True`` keeps them for every
    call (gradient accumulation and activation checkpointing then quantize and pack each
    weight once per optimizer step), ``False`` never.
    The codes are made again after any optimizer step (torch.optim.Optimizer), any in-place
    write to the weight (``copy_``, ``load_state_dict``), a new weight tensor (``.to()``,
    assignment) or a change of ``bits`` / ``group_size``; on the CPU also when any of 64
    elements spread over the weight changed, which catches whole-weight writes torch does not
    record (through ``weight.data``, FSDP2 gathering a reloaded weight into the same memory).
    Not seen: unrecorded writes of a few elements that miss those (call
    ``clear_weight_codes()`` after such), and on CUDA any unrecorded write, where the default
    keeps no codes (the comparison would wait for the GPU at every call) and ``True`` trusts
    the version counter. Under torch.compile the layer keeps nothing itself; a compiled call
    that wants no gradient has the op keep Q(W) per weight tensor, with the same checks
    (ops/shiftquant/kept.py), while compiled calls that train quantize the weight each time.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        bits: int = 8,
        grad_bits: int | None = None,
        group_size: int = 64,
        cache_weight_codes: bool | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        in_features = check_int("ShiftQuantLinear", "in_features", in_features, 0)
        out_features = check_int("ShiftQuantLinear", "out_features", out_features, 0)
        bits, group_size = check_spec("ShiftQuantLinear", bits, group_size)
        if grad_bits is not None:
            grad_bits, _ = check_spec("ShiftQuantLinear", grad_bits, group_size, "grad_bits")
        self.in_features, self.out_features = in_features, out_features
        if cache_weight_codes is not None and not isinstance(cache_weight_codes, bool):
            raise TypeError(
                "ShiftQuantLinear: cache_weight_codes must be a bool or None, got "
                f"{type(cache_weight_codes).__name__}"
            )
        self.bits, self.grad_bits, self.group_size = bits, grad_bits, group_size
        self.cache_weight_codes = cache_weight_codes
        self._codes: kept.WeightCodes | None = None
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's initialization.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, share: bool = False, **kw) -> ShiftQuantLinear:
        """A ShiftQuantLinear holding a copy of ``linear``'s weight and bias, or with
        ``share=True`` the very same Parameters (where they are plain Parameters): a swap in
        place then keeps weights tied to other modules and an optimizer's references valid."""
        w = linear.weight
        shared = share and plain_parameters(linear, ("weight", "bias"))
        out = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            device="meta" if shared else w.device,
            dtype=w.dtype,
            **kw,
        )
        if shared:
            out.weight, out.bias = linear.weight, linear.bias
            return out
        with torch.no_grad():
            out.weight.copy_(w)
            if linear.bias is not None:
                out.bias.copy_(linear.bias)
        return frozen_as(out, linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = own(self, "weight"), own(self, "bias")
        codes = None if self.cache_weight_codes is False else self._weight_codes(x, w, b)
        keep = codes is None and self._keeps_compiled(x, w, b)
        return linear_with_codes(
            x, w, b, self.bits, self.grad_bits, self.group_size, codes, keep_codes=keep
        )

    def __getstate__(self) -> dict:
        # A pickled or deep-copied layer starts without the cache (up to 4 bytes per weight
        # element that the copy would make again anyway: its weight is another tensor).
        return {**super().__getstate__(), "_codes": None}

    def clear_weight_codes(self) -> None:
        """Drops the cached weight codes (``cache_weight_codes``): the next call makes them
        from the weight as it is then."""
        self._codes = None
        if isinstance(self.weight, torch.Tensor):
            kept.drop(self.weight)

    @staticmethod
    def _trains(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> bool:
        """Whether a call on x with weight w and bias b wants a gradient."""
        return torch.is_grad_enabled() and (
            x.requires_grad or w.requires_grad or (b is not None and b.requires_grad)
        )

    def _weight_codes(
        self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None
    ) -> list[torch.Tensor] | None:
        """The cached Q(w) of the weight w, and Q(wᵀ) where a backward may follow; None where
        the cache does not apply (torch.compile, tensor subclasses, inference tensors, bad
        input, a call that trains under the default policy: whose codes are then let go)."""
        if torch.compiler.is_compiling() or not isinstance(x, torch.Tensor):
            return None  # (bad input: the op names it)
        trains = self._trains(x, w, b)
        if self.cache_weight_codes is None and (trains or not x.is_cpu):
            # (on a GPU the sampled check would wait for the device at every call)
            self._codes = None
            return None
        if not kept.can_keep(w) or w.device != x.device:
            return None
        codes = kept.refresh(self._codes, w, self.bits, self.group_size, trains, self._make_codes)
        if codes is not self._codes:  # (nn.Module.__setattr__ costs 2-3 us a call)
            self._codes = codes
        return codes.forward + codes.transposed

    def _keeps_compiled(self, x: object, w: torch.Tensor, b: torch.Tensor | None) -> bool:
        """Whether a call being compiled asks the op to keep the weight's codes itself
        (ops/shiftquant/kept.py): one that wants no gradient, where the eager layer would keep
        them (the default: on the CPU)."""
        return (
            torch.compiler.is_compiling()
            and self.cache_weight_codes is not False
            and isinstance(x, torch.Tensor)
            and (self.cache_weight_codes or x.is_cpu)
            and not self._trains(x, w, b)
        )

    def _make_codes(self, w, bits, group_size, transposed=False) -> list[torch.Tensor]:
        check_spec("ShiftQuantLinear", bits, group_size)
        return weight_operand(w, bits, group_size, transposed=transposed)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, bits={self.bits}, grad_bits={self.grad_bits}, "
            f"group_size={self.group_size}"
        )


def quantize_model(
    model: nn.Module,
    bits: int = 8,
    grad_bits: int | None = None,
    group_size: int = 64,
    norms: bool = True,
) -> nn.Module:
    """Swaps every nn.Linear for a ShiftQuantLinear and (``norms``) every nn.LayerNorm for an
    L1LayerNorm, in place, keeping their parameters; returns ``model``, or its replacement when
    ``model`` itself is one of them. A module used in several places becomes one replacement
    used in all of them (sharing kept).

    The swapped norms compute their statistics in float (their outputs feed ShiftQuantLinears,
    which quantize them anyway); build ``L1LayerNorm(bits=...)`` directly for integer statistics.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_model: model must be an nn.Module, got {type(model).__name__}")
    bits, group_size = check_spec("quantize_model", bits, group_size)
    if grad_bits is not None:
        grad_bits, _ = check_spec("quantize_model", grad_bits, group_size, "grad_bits")
    if not isinstance(norms, bool):
        raise TypeError(f"quantize_model: norms must be a bool, got {type(norms).__name__}")
    # id of a module -> (the module, kept alive so that its id stays unique; its replacement)
    swapped: dict[int, tuple[nn.Module, nn.Module]] = {}

    def swap(module: nn.Module) -> nn.Module:
        if id(module) in swapped:
            return swapped[id(module)][1]
        if isinstance(module, nn.Linear) and not isinstance(module, ShiftQuantLinear):
            out = ShiftQuantLinear.from_linear(
                module, share=True, bits=bits, grad_bits=grad_bits, group_size=group_size
            )
        elif norms and isinstance(module, nn.LayerNorm):
            out = L1LayerNorm.from_layer_norm(module, share=True)
        else:
            out = module
        swapped[id(module)] = (module, out)
        if out is module:
            # Every name of every child, repeated ones included (named_children skips them).
            for name, child in list(module._modules.items()):
                if child is not None:
                    setattr(module, name, swap(child))
        return out

    return swap(model)
