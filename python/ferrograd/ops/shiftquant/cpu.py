"""The Rust ShiftQuant kernels on CPU tensors: the quantizers read float32 and bfloat16 as they
are (other floating dtypes are converted to float32 first), the GEMM writes float32 or bfloat16
(other dtypes: converted from float32)."""

from __future__ import annotations

import math
import threading

import torch

from ... import _core
from .._memory import HUGE_PAGE, fresh

Quantized = tuple[torch.Tensor, torch.Tensor, torch.Tensor]

#: Operands up to this many bytes (codes, scale and shifts) are carved from a slot's workspace.
WORKSPACE_MAX_BYTES = 1 << 26
_MAX_CARVED = 64


class _Workspace(threading.local):
    """Per thread, per slot: the bytes that ShiftQuantLinear's GEMM operands are carved from.

    The operands die inside the layer's call (each one's GEMM runs before its slot is used
    again), so one buffer per slot serves every call: the layer then writes pages it has written
    before. Fresh tensors of a few MB come from new mappings whenever glibc's allocator has
    handed the previous ones back, and their first writes page-fault: in such processes a third
    of the backward's time at 1024 tokens, 512 -> 1376 (docs/shiftquant.md).
    """

    def __init__(self) -> None:
        self.buffers: dict[int, torch.Tensor] = {}
        #: (slot, rows, length, group_size) -> the carved (codes, scale, shifts): a layer asks
        #: for the same shapes every call, and carving costs more than a small quantization.
        self.carved: dict[tuple[int, int, int, int], Quantized] = {}

    def outputs(self, slot: int, rows: int, length: int, group_size: int) -> Quantized:
        key = (slot, rows, length, group_size)
        carved = self.carved.get(key)
        if carved is not None:
            return carved
        if len(self.carved) >= _MAX_CARVED:  # shapes that keep changing (sequence lengths)
            self.carved.clear()
        groups = -(-length // group_size)
        sizes = (4 * rows, rows * length, rows * groups)
        buf = self.buffers.get(slot)
        if buf is None or buf.numel() < sum(sizes):
            buf = self.buffers[slot] = torch.empty(sum(sizes), dtype=torch.uint8)
            self.carved = {k: v for k, v in self.carved.items() if k[0] != slot}
        # scale first, where the float32 alignment holds
        scale, codes, shifts = buf[: sum(sizes)].split(sizes)
        carved = self.carved[key] = (
            codes.view(torch.int8).view(rows, length),
            scale.view(torch.float32),
            shifts.view(rows, groups),
        )
        return carved


_WORKSPACE = _Workspace()


def quantize(
    x: torch.Tensor,
    bits: int,
    group_size: int,
    seed: int | None,
    transposed: bool,
    slot: int | None = None,
) -> Quantized:
    """codes, scale, shifts of a matrix [R, C] along C (or along R with ``transposed``: then of
    shape [C, R], the quantization of x.T). ``seed`` None rounds to nearest. With ``slot``,
    the result lives in that slot of this thread's workspace until the slot's next use."""
    return _quantize(x, bits, group_size, seed, transposed, None, slot)


def quantize_with_col_sums(
    x: torch.Tensor, bits: int, group_size: int, seed: int | None, slot: int | None = None
) -> tuple[Quantized, torch.Tensor]:
    """``quantize(x, ..., transposed=True)`` and the float32 sums of x's columns, from one read
    of x (ShiftQuantLinear's dW operand and bias gradient)."""
    sums = torch.empty(x.shape[1], dtype=torch.float32)
    return _quantize(x, bits, group_size, seed, True, sums, slot), sums


def _outputs(rows: int, length: int, group_size: int, slot: int | None) -> Quantized:
    """Empty codes [rows, length], scale [rows] and shifts [rows, groups]: fresh tensors, or
    views of one workspace slot."""
    groups = -(-length // group_size)
    if slot is None or rows * (length + 4 + groups) > WORKSPACE_MAX_BYTES:
        return (
            torch.empty((rows, length), dtype=torch.int8),
            torch.empty(rows, dtype=torch.float32),
            torch.empty((rows, groups), dtype=torch.uint8),
        )
    return _WORKSPACE.outputs(slot, rows, length, group_size)


def _quantize(x, bits, group_size, seed, transposed, col_sums, slot) -> Quantized:
    bf16 = x.dtype == torch.bfloat16
    x = (x if bf16 or x.dtype == torch.float32 else x.float()).contiguous()
    rows, length = x.shape[::-1] if transposed else x.shape
    if group_size <= 0:  # the kernel checks it too, but the outputs are sized by it first
        raise ValueError(
            f"shiftquant: group_size must be a positive multiple of 4, got {group_size}"
        )
    codes, scale, shifts = _outputs(rows, length, group_size, slot)
    _core.shiftquant_quantize(
        x, codes, scale, shifts, length, bits, group_size, seed, transposed, col_sums
    )
    return codes, scale, shifts


def dequantize(
    codes: torch.Tensor, scale: torch.Tensor, shifts: torch.Tensor, group_size: int
) -> torch.Tensor:
    # The kernel reads rows of len(codes) / len(scale) codes: codes [8, 64] with 4 scales
    # would pass its checks as 4 rows of 128.
    if codes.dim() == 0 or scale.numel() != math.prod(codes.shape[:-1]):
        raise ValueError(
            f"shiftquant_dequantize: scale must hold one value per row of codes "
            f"{tuple(codes.shape)}, got {scale.numel()}"
        )
    out = fresh(torch.empty(codes.shape, dtype=torch.float32))
    _core.shiftquant_dequantize(
        codes.contiguous(), scale.contiguous(), shifts.contiguous(), group_size, out
    )
    return out


def matmul(
    a_codes: torch.Tensor,
    a_scale: torch.Tensor,
    a_shifts: torch.Tensor,
    b_codes: torch.Tensor,
    b_scale: torch.Tensor,
    b_shifts: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None,
    dtype: torch.dtype,
    packed_b: torch.Tensor | None = None,
) -> torch.Tensor:
    """a @ b.T (+ bias); ``packed_b`` (``pack_weight`` of b) spares packing b."""
    m, k = a_codes.shape
    bf16 = dtype == torch.bfloat16
    out = torch.empty((m, b_codes.shape[0]), dtype=dtype if bf16 else torch.float32)
    out = fresh(out, HUGE_PAGE)
    operands = [t.contiguous() for t in (a_codes, a_scale, a_shifts, b_codes, b_scale, b_shifts)]
    bias = None if bias is None else bias.float().contiguous()
    _core.shiftquant_matmul(*operands, k, group_size, out, bias, packed_b)
    return out if bf16 or dtype == torch.float32 else out.to(dtype)


def pack_weight(
    codes: torch.Tensor, scale: torch.Tensor, shifts: torch.Tensor, group_size: int
) -> torch.Tensor:
    """The quantized weight [N, K] in the GEMM kernel's panels (uint8; the layout is
    rust/shiftquant/gemm/prepacked.rs'), for ``matmul(..., packed_b=)`` with it as b."""
    n, k = codes.shape
    out = torch.empty(_core.shiftquant_packed_weight_bytes(n, k, group_size), dtype=torch.uint8)
    operands = [t.contiguous() for t in (codes, scale, shifts)]
    _core.shiftquant_pack_weight(*operands, k, group_size, out)
    return out
