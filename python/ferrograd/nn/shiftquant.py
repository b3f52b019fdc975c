"""ShiftQuantLinear and quantize_model: sub-8-bit integer training of a model's linears."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..ops.shiftquant import check_spec, shiftquant_linear
from .l1norm import L1LayerNorm


class ShiftQuantLinear(nn.Module):
    """nn.Linear whose forward and backward GEMMs run on ShiftQuant integer codes.

    Activations and weights are rounded to nearest at ``bits``; the output gradient is rounded
    stochastically at ``grad_bits`` (default: ``bits``). The parameters stay float32 (the
    optimizer updates them as usual); only the GEMM operands are quantized.
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
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        check_spec("ShiftQuantLinear", bits, group_size)
        if grad_bits is not None:
            check_spec("ShiftQuantLinear", grad_bits, group_size)
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.grad_bits, self.group_size = bits, grad_bits, group_size
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
    def from_linear(cls, linear: nn.Linear, **kw) -> ShiftQuantLinear:
        """A ShiftQuantLinear holding a copy of ``linear``'s weight and bias."""
        w = linear.weight
        out = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            device=w.device,
            dtype=w.dtype,
            **kw,
        )
        with torch.no_grad():
            out.weight.copy_(w)
            if linear.bias is not None:
                out.bias.copy_(linear.bias)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return shiftquant_linear(
            x,
            self.weight,
            self.bias,
            bits=self.bits,
            grad_bits=self.grad_bits,
            group_size=self.group_size,
        )

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
    L1LayerNorm, in place, keeping their parameters; returns ``model``.

    The swapped norms compute their statistics in float (their outputs feed ShiftQuantLinears,
    which quantize them anyway); build ``L1LayerNorm(bits=...)`` directly for integer statistics.
    """
    check_spec("quantize_model", bits, group_size)
    for name, child in list(model.named_children()):
        if isinstance(child, nn.Linear) and not isinstance(child, ShiftQuantLinear):
            swapped = ShiftQuantLinear.from_linear(
                child, bits=bits, grad_bits=grad_bits, group_size=group_size
            )
            setattr(model, name, swapped)
        elif norms and isinstance(child, nn.LayerNorm):
            setattr(model, name, L1LayerNorm.from_layer_norm(child))
        else:
            quantize_model(child, bits, grad_bits, group_size, norms)
    return model
