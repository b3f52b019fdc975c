"""L1LayerNorm: a drop-in for nn.LayerNorm with an L1 (mean absolute deviation) statistic."""

from __future__ import annotations

import numbers

import torch
from torch import nn

from ..ops.l1norm import l1_layer_norm


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
        bits: int | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if isinstance(normalized_shape, numbers.Integral):
            normalized_shape = (int(normalized_shape),)
        self.normalized_shape = tuple(normalized_shape)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        self.bits = bits
        if elementwise_affine:
            kw = {"device": device, "dtype": dtype}
            self.weight = nn.Parameter(torch.ones(self.normalized_shape, **kw))
            self.bias = nn.Parameter(torch.zeros(self.normalized_shape, **kw))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    @classmethod
    def from_layer_norm(cls, norm: nn.LayerNorm, *, bits: int | None = None) -> L1LayerNorm:
        """An L1LayerNorm with ``norm``'s shape, eps and (copied) affine parameters."""
        out = cls(norm.normalized_shape, norm.eps, norm.elementwise_affine, bits=bits)
        if norm.elementwise_affine:
            with torch.no_grad():
                out.weight.copy_(norm.weight)
                if norm.bias is not None:
                    out.bias.copy_(norm.bias)
                else:
                    out.bias = None
        return out.to(device=next(norm.parameters(), torch.empty(0)).device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return l1_layer_norm(
            x, self.normalized_shape, self.weight, self.bias, self.eps, bits=self.bits
        )

    def extra_repr(self) -> str:
        bits = "" if self.bits is None else f", bits={self.bits}"
        return (
            f"{self.normalized_shape}, eps={self.eps}, "
            f"elementwise_affine={self.elementwise_affine}{bits}"
        )
