"""W4 weight-only quantization (DESIGN.md section 5) and the weight object the W4A16 kernels read.

Rule, per group of ``group_size`` consecutive input channels of a row of W [N, K] (-1: the whole
row), rounding half to even as torch.round:

- zero points: scale = (max - min) / 15, zero = clamp(round(-min / scale), 0, 15),
  q = clamp(round(w / scale) + zero, 0, 15), w_hat = (q - zero) * scale;
- symmetric: scale = max|w| / 7, q = clamp(round(w / scale), -8, 7), w_hat = q * scale;
- a group whose scale would be 0 gets scale 1 (its codes dequantize to 0 exactly).

Codes are computed with the float32 scale; the stored scale is float16 (bfloat16 for a bfloat16
weight), and ``dequantize()`` and the kernels use the stored one.

Layout (CPU): ``packed`` is uint8 [N, ceil(K / 64) * 32]; byte j of 32-byte block b of row n
holds the stored code (q, or q + 8 when symmetric) of column 64 b + j in its low nibble and of
column 64 b + 32 + j in its high nibble; columns past K hold 0. ``scales`` and ``zeros`` are
[N, ceil(K / group_size)].
"""

from __future__ import annotations

import torch

from .. import _core
from ..ops._checks import check_floating, check_tensor

__all__ = ["W4Weight", "group_len", "quantize_w4"]

OP = "quantize_w4"
BLOCK = 64
SYMMETRIC_ZERO = 8


def _scale_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float16


def group_len(k: int, group_size: int) -> int:
    """Columns per group of a K-column weight: ``group_size``, or K for -1 (whole rows)."""
    return k if group_size == -1 else group_size


def unpack_torch(packed: torch.Tensor, k: int) -> torch.Tensor:
    """The CPU layout unpacked with torch ops (any device): stored codes [N, K]."""
    blocks = packed.view(packed.shape[0], -1, BLOCK // 2)
    both = torch.cat([blocks & 15, blocks >> 4], dim=-1)  # the 64 columns of each block in order
    return both.reshape(packed.shape[0], -1)[:, :k].contiguous()


class W4Weight:
    """A 4-bit weight [N, K]: ``packed`` codes, ``scales`` (float16 / bfloat16) and ``zeros``
    (uint8, None for the symmetric scheme), in the layout of the module docstring."""

    def __init__(
        self,
        packed: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor | None,
        shape: tuple[int, int],
        group_size: int,
        dtype: torch.dtype,
    ) -> None:
        self.packed, self.scales, self.zeros = packed, scales, zeros
        self.shape = torch.Size(shape)
        self.group_size = group_size
        self.dtype = dtype
        self._kernel_params: tuple[torch.Tensor, torch.Tensor] | None = None
        #: Per-dtype GPU operands of kernels/w4a16.cu (ferrograd.ops.w4a16_cuda fills it).
        self.cuda_operands: dict[torch.dtype, tuple[torch.Tensor, ...]] = {}

    @property
    def zero_point(self) -> bool:
        return self.zeros is not None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def group_len(self) -> int:
        """Columns per group (the whole row for group_size -1)."""
        return group_len(self.shape[1], self.group_size)

    def kernel_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 scales and uint8 stored zeros (8 when symmetric), as the CPU kernels read
        them; computed once."""
        if self._kernel_params is None:
            zeros = self.zeros
            if zeros is None:
                zeros = torch.full_like(self.scales, SYMMETRIC_ZERO, dtype=torch.uint8)
            self._kernel_params = (self.scales.float().contiguous(), zeros.contiguous())
        return self._kernel_params

    def stored_codes(self) -> torch.Tensor:
        """uint8 [N, K] codes as stored: q with zero points, q + 8 when symmetric."""
        n, k = self.shape
        if self.device.type != "cpu":
            return unpack_torch(self.packed, k)
        codes = torch.empty(n, k, dtype=torch.uint8)
        _core.w4_pack(codes, self.packed.contiguous(), n, k, unpack=True)
        return codes

    @property
    def codes(self) -> torch.Tensor:
        """The rule's codes [N, K]: uint8 0..15 with zero points, int8 -8..7 without."""
        stored = self.stored_codes()
        return stored if self.zero_point else (stored.to(torch.int8) - SYMMETRIC_ZERO)

    def dequantize(self) -> torch.Tensor:
        """W_hat [N, K] = (q - zero) * scale in the original weight's dtype, on this device."""
        n, k = self.shape
        if self.device.type == "cpu":
            out = torch.empty(n, k)
            scales, zeros = self.kernel_params()
            _core.w4_dequantize(
                self.packed, scales, zeros, n, k, self.group_size,
                0, n, out,
            )  # fmt: skip
            return out.to(self.dtype)
        q = self.stored_codes().to(self.device).float()
        scales, zeros = (t.to(self.device).float() for t in self.kernel_params())
        per_column = torch.arange(k, device=self.device) // self.group_len
        return ((q - zeros[:, per_column]) * scales[:, per_column]).to(self.dtype)

    def to(self, device: torch.device | str) -> W4Weight:
        """The same weight on ``device`` (same layout)."""
        zeros = None if self.zeros is None else self.zeros.to(device)
        packed, scales = self.packed.to(device), self.scales.to(device)
        return W4Weight(packed, scales, zeros, tuple(self.shape), self.group_size, self.dtype)

    def __repr__(self) -> str:
        return (
            f"W4Weight(shape={tuple(self.shape)}, group_size={self.group_size}, "
            f"zero_point={self.zero_point}, scales={self.scales.dtype}, device={self.device})"
        )


def quantize_w4(weight: torch.Tensor, group_size: int = 128, zero_point: bool = True) -> W4Weight:
    """Quantizes ``weight`` [N, K] (any float dtype, any device; computed on the CPU in float32)
    to 4 bits by round to nearest per group of ``group_size`` input channels (-1: whole rows)."""
    check_tensor(OP, "weight", weight)
    check_floating(OP, "weight", weight)
    if weight.dim() != 2 or 0 in weight.shape:
        raise ValueError(
            f"{OP}: weight must be a non-empty 2-D [N, K] tensor, got {tuple(weight.shape)}"
        )
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"{OP}: group_size must be an int, got {type(group_size).__name__}")
    if group_size != -1 and group_size <= 0:
        raise ValueError(f"{OP}: group_size must be positive or -1 (whole rows), got {group_size}")
    if not isinstance(zero_point, bool):
        raise TypeError(f"{OP}: zero_point must be a bool, got {type(zero_point).__name__}")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError(f"{OP}: weight holds NaN or infinity")
    n, k = weight.shape
    groups = -(-k // group_len(k, group_size))
    w = weight.detach().to("cpu", torch.float32).contiguous()
    codes = torch.empty(n, k, dtype=torch.uint8)
    scales = torch.empty(n, groups)
    zeros = torch.empty(n, groups, dtype=torch.uint8)
    _core.w4_quantize(
        w, n, k, group_size, zero_point, codes, scales, zeros
    )
    packed = torch.empty(n, -(-k // BLOCK) * (BLOCK // 2), dtype=torch.uint8)
    _core.w4_pack(codes, packed, n, k)
    stored_scales = scales.to(_scale_dtype(weight.dtype))
    q = W4Weight(
        packed, stored_scales, zeros if zero_point else None, (n, k), group_size, weight.dtype
    )
    return q.to(weight.device)
