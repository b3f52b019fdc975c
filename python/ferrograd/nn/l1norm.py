"""L1LayerNorm and L1RMSNorm: drop-ins for nn.LayerNorm and RMSNorm with L1 (mean absolute)
statistics."""

from __future__ import annotations

import torch
from torch import nn

from ..ops.l1norm import (
    CODES_GROUP_SIZE,
    check_eps,
    check_normalized_shape,
    l1_layer_norm,
    l1_rms_norm,
)
from ..ops.shiftquant import check_spec
from ._own import own
from ._swap import frozen_as, plain_parameters


def _check_bits(cls: str, bits: object) -> int | None:
    return None if bits is None else check_spec(cls, bits, CODES_GROUP_SIZE)[0]


class L1LayerNorm(nn.Module):
    """y = (x - mean) / (sqrt(pi/2) * mean|x - mean| + eps) * weight + bias.

    Matches nn.LayerNorm on Gaussian inputs; ``bits`` computes the statistics from ShiftQuant
    codes of the input (fully quantized normalization).
    """

    def __init__(
        self,
        normalized_shape: int | tuple[int, ...],
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        *,
        bias: bool = True,
        bits: int | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.normalized_shape = check_normalized_shape("L1LayerNorm", normalized_shape)
        self.eps = check_eps("L1LayerNorm", eps)
        self.bits = _check_bits("L1LayerNorm", bits)
        self.elementwise_affine = elementwise_affine
        kw = {"device": device, "dtype": dtype}
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(self.normalized_shape, **kw))
        else:
            self.register_parameter("weight", None)
        if elementwise_affine and bias:
            self.bias = nn.Parameter(torch.zeros(self.normalized_shape, **kw))
        else:
            self.register_parameter("bias", None)

    def reset_parameters(self) -> None:
        """Weight 1, bias 0, as nn.LayerNorm's (the meta-device recipe: ``to_empty`` and then
        each module's ``reset_parameters``)."""
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    @classmethod
    def from_layer_norm(
        cls, norm: nn.LayerNorm, *, bits: int | None = None, share: bool = False
    ) -> L1LayerNorm:
        """An L1LayerNorm with ``norm``'s shape, eps and affine parameters (copies on their
        device and in their dtype, or with ``share=True`` the very same Parameters, as
        ``ShiftQuantLinear.from_linear`` shares them)."""
        weight = norm.weight if norm.elementwise_affine else None
        shared = share and plain_parameters(norm, ("weight", "bias"))
        out = cls(
            norm.normalized_shape,
            norm.eps,
            norm.elementwise_affine,
            bias=norm.bias is not None,
            bits=bits,
            device="meta" if shared else None if weight is None else weight.device,
            dtype=None if weight is None else weight.dtype,
        )
        if shared:
            out.weight, out.bias = norm.weight, norm.bias
        elif weight is not None:
            with torch.no_grad():
                out.weight.copy_(weight)
                if norm.bias is not None:
                    out.bias.copy_(norm.bias)
            frozen_as(out, norm)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = own(self, "weight"), own(self, "bias")
        return l1_layer_norm(x, self.normalized_shape, weight, bias, self.eps, bits=self.bits)

    def extra_repr(self) -> str:
        bits = "" if self.bits is None else f", bits={self.bits}"
        bias = "" if self.bias is not None or not self.elementwise_affine else ", bias=False"
        return (
            f"{self.normalized_shape}, eps={self.eps}, "
            f"elementwise_affine={self.elementwise_affine}{bias}{bits}"
        )


class L1RMSNorm(nn.Module):
    """y = x / (sqrt(pi/2) * mean|x| + eps) * weight over the last dim.

    A drop-in for RMSNorm (matches it on zero-mean Gaussian inputs) without a square root in the
    statistic; ``bits`` computes it from ShiftQuant codes of the input.
    """

    def __init__(
        self,
        normalized_shape: int | tuple[int],
        eps: float = 1e-6,
        *,
        bits: int | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.normalized_shape = check_normalized_shape("L1RMSNorm", normalized_shape)
        if len(self.normalized_shape) != 1:
            raise ValueError(
                f"L1RMSNorm: normalized_shape must be one dim (the last), got {normalized_shape}"
            )
        self.eps = check_eps("L1RMSNorm", eps)
        self.bits = _check_bits("L1RMSNorm", bits)
        self.weight = nn.Parameter(torch.ones(self.normalized_shape, device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        """Weight 1, as nn.RMSNorm's."""
        nn.init.ones_(self.weight)

    @classmethod
    def from_rms_norm(
        cls,
        norm: nn.Module,
        *,
        bits: int | None = None,
        weight_offset: float = 0.0,
        share: bool = False,
    ) -> L1RMSNorm:
        """An L1RMSNorm with the weight (plus ``weight_offset``: 1 for norms that scale by
        1 + weight, as Gemma's) and eps of an RMSNorm module with ``.weight`` and
        ``.variance_epsilon`` or ``.eps`` (None: the weight dtype's machine epsilon, as
        nn.RMSNorm). The weight is copied, or with ``share=True`` and no offset the very same
        Parameter is held (as ``ShiftQuantLinear.from_linear`` shares)."""
        weight = getattr(norm, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
            raise TypeError(f"L1RMSNorm.from_rms_norm: {type(norm).__name__} has no 1-dim .weight")
        eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
        if eps is None:
            eps = torch.finfo(weight.dtype).eps
        shared = share and weight_offset == 0 and plain_parameters(norm, ("weight",))
        device = "meta" if shared else weight.device
        out = cls(weight.shape[0], eps, bits=bits, device=device, dtype=weight.dtype)
        if shared:
            out.weight = norm.weight
            return out
        with torch.no_grad():
            out.weight.copy_(weight + weight_offset)
        return frozen_as(out, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return l1_rms_norm(x, own(self, "weight"), self.eps, bits=self.bits)

    def extra_repr(self) -> str:
        bits = "" if self.bits is None else f", bits={self.bits}"
        return f"{self.normalized_shape}, eps={self.eps}{bits}"
