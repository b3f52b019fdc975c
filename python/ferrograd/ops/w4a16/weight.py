"""The W4 weight as a value: 4-bit codes packed in a named layout, with their scales and zeros.

A stored code is q (0..15) with zero points and q + 8 without (docs/definitions.md gives the
rule). Two layouts, defined here and nowhere else; the kernels read and write exactly these:

- ``"cpu_blocks"`` (the Rust kernels; the layout of a weight on any device but CUDA): packed
  uint8 [N, ceil(K / 64) * 32]; byte j of 32-byte block b of row n holds the code of column
  64 b + j in its low nibble and of column 64 b + 32 + j in its high nibble.
- ``"gpu_words"`` (kernels/w4a16.cu; the layout of a weight on a CUDA device): packed int32
  [N, ceil(K / 8)]; word j of row n holds the codes of columns 8j .. 8j + 7 in nibbles 0 .. 7,
  so byte t holds columns 8j + 2t and 8j + 2t + 1: the pair one lane of an m16n8k16 B fragment
  needs.

Columns past K hold code 0 in both. ``scales`` are [N, G]: float16 (bfloat16 for a bfloat16
weight) when every scale of the weight lies in that type's normal range, float32 otherwise, so
that storage never flushes or overflows a scale (``store_scales``); ``zeros`` uint8 [N, G] or
None for the symmetric scheme, G = ceil(K / group length).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

__all__ = [
    "CPU_BLOCKS",
    "GPU_WORDS",
    "LAYOUTS",
    "W4Weight",
    "convert",
    "group_len",
    "kernel_zeros",
    "native_layout",
    "pack",
    "packed_shape",
    "scale_dtype",
    "store_scales",
    "unpack",
]

CPU_BLOCKS = "cpu_blocks"
GPU_WORDS = "gpu_words"
LAYOUTS = (CPU_BLOCKS, GPU_WORDS)
#: Columns per block of the CPU layout (two nibbles of 32 bytes).
BLOCK = 64
#: Columns per word of the GPU layout.
WORD = 8
#: The stored zero of the symmetric scheme (codes -8..7 are stored as 0..15).
SYMMETRIC_ZERO = 8


def group_len(k: int, group_size: int) -> int:
    """Columns per group of a K-column weight: ``group_size``, or K for -1 (whole rows)."""
    return k if group_size == -1 else group_size


def check_x(x: torch.Tensor, k: int) -> None:
    """x [..., K] for a K-column weight, or the ValueError naming the op and x: the packed
    layouts pad K (to blocks of 64 on the CPU), so the weight's tensors alone cannot tell a
    shorter x from the right one."""
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(
            f"w4a16_matmul: x must have shape [..., K] with K = {k}, got {tuple(x.shape)}"
        )


def native_layout(device: torch.device | str) -> str:
    """The layout a weight takes on ``device``: the GPU kernel's on CUDA, the CPU one elsewhere."""
    return GPU_WORDS if torch.device(device).type == "cuda" else CPU_BLOCKS


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"W4Weight: layout must be one of {LAYOUTS}, got {layout!r}")


def packed_shape(n: int, k: int, layout: str) -> tuple[tuple[int, int], torch.dtype]:
    """Shape and dtype of the packed codes of an [N, K] weight in ``layout``."""
    if layout == CPU_BLOCKS:
        return (n, -(-k // BLOCK) * (BLOCK // 2)), torch.uint8
    return (n, -(-k // WORD)), torch.int32


def pack(codes: torch.Tensor, layout: str) -> torch.Tensor:
    """Stored codes uint8 [N, K] (0..15) -> packed codes in ``layout`` (torch ops, any device)."""
    n, k = codes.shape
    if layout == CPU_BLOCKS:
        halves = F.pad(codes, (0, -k % BLOCK)).view(n, -1, 2, BLOCK // 2)
        return (halves[:, :, 0] | (halves[:, :, 1] << 4)).reshape(n, -1)
    pairs = F.pad(codes, (0, -k % WORD)).view(n, -1, 2)
    # Little-endian: byte t of a word is its nibbles 2t and 2t + 1.
    return (pairs[..., 0] | (pairs[..., 1] << 4)).view(torch.int32)


def unpack(packed: torch.Tensor, layout: str, k: int) -> torch.Tensor:
    """Packed codes in ``layout`` -> stored codes uint8 [N, K] (torch ops, any device)."""
    n = packed.shape[0]
    if layout == CPU_BLOCKS:
        blocks = packed.view(n, -1, BLOCK // 2)
        codes = torch.cat([blocks & 15, blocks >> 4], dim=-1)  # each block's 64 columns in order
    else:
        pairs = packed.contiguous().view(torch.uint8)
        codes = torch.stack([pairs & 15, pairs >> 4], dim=-1)
    return codes.reshape(n, -1)[:, :k].contiguous()


def convert(packed: torch.Tensor, source: str, target: str, k: int) -> torch.Tensor:
    """Packed codes of a K-column weight from layout ``source`` to ``target``."""
    return packed if source == target else pack(unpack(packed, source, k), target)


def scale_dtype(dtype: torch.dtype) -> torch.dtype:
    """The 16-bit type scales of a weight of ``dtype`` are stored in when they all fit it."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float16


def store_scales(scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The quantizer's float32 ``scales`` of a weight of ``dtype`` as stored: in
    ``scale_dtype(dtype)`` when every one of them stays in its normal range there, else float32
    as they are. The choice depends on the values, so a traced (compiled) quantization keeps
    float32."""
    if torch.compiler.is_compiling():
        return scales
    narrow = scales.to(scale_dtype(dtype))
    fits = (narrow >= torch.finfo(narrow.dtype).tiny) & (narrow <= torch.finfo(narrow.dtype).max)
    return narrow if bool(fits.all()) else scales


def kernel_zeros(scales: torch.Tensor, zeros: torch.Tensor | None) -> torch.Tensor:
    """The stored zeros as every kernel reads them: uint8 [N, G], 8 for the symmetric scheme."""
    if zeros is None:
        return torch.full_like(scales, SYMMETRIC_ZERO, dtype=torch.uint8)
    return zeros.contiguous()


_FIELD_DTYPES = {
    "packed": (torch.uint8, torch.int32),
    "scales": (torch.float16, torch.bfloat16, torch.float32),
    "zeros": (torch.uint8,),
}


def _check_fields(w: W4Weight) -> None:
    """TypeError naming the field whose type or dtype is wrong; ValueError for bad values."""
    for name, dtypes in _FIELD_DTYPES.items():
        t = getattr(w, name)
        if t is None and name == "zeros":
            continue
        if not isinstance(t, torch.Tensor) or t.dtype not in dtypes:
            got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(f"W4Weight: {name} must be a tensor of dtype {dtypes}, got {got}")
    shape = w.shape
    if not (
        isinstance(shape, (tuple, list, torch.Size))
        and len(shape) == 2
        and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)
    ):
        raise ValueError(f"W4Weight: shape must be two positive ints [N, K], got {shape!r}")
    if isinstance(w.group_size, bool) or not isinstance(w.group_size, int):
        raise TypeError(f"W4Weight: group_size must be an int, got {type(w.group_size).__name__}")
    if w.group_size != -1 and w.group_size <= 0:
        raise ValueError(f"W4Weight: group_size must be positive or -1, got {w.group_size}")
    if not isinstance(w.dtype, torch.dtype) or not w.dtype.is_floating_point:
        raise TypeError(f"W4Weight: dtype must be a floating torch.dtype, got {w.dtype!r}")


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class W4Weight:
    """A 4-bit weight [N, K] (``fg.quant.quantize_w4``): ``packed`` codes in ``layout``,
    ``scales`` (float16 / bfloat16 / float32) and ``zeros`` (uint8, None for the symmetric
    scheme), as the module docstring lays out; fields of the wrong type or dtype are a
    TypeError naming the field. Immutable: ``to`` and ``with_layout`` return new weights."""

    packed: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    shape: torch.Size
    group_size: int
    #: The dtype of the weight that was quantized (``dequantize()`` returns it).
    dtype: torch.dtype
    layout: str = CPU_BLOCKS

    def __post_init__(self) -> None:
        _check_layout(self.layout)
        _check_fields(self)
        object.__setattr__(self, "shape", torch.Size(self.shape))
        n, k = self.shape
        want, dtype = packed_shape(n, k, self.layout)
        if tuple(self.packed.shape) != want or self.packed.dtype != dtype:
            raise ValueError(
                f"W4Weight: packed must be {dtype} {list(want)} for a [{n}, {k}] weight in "
                f"layout {self.layout!r}, got {self.packed.dtype} {list(self.packed.shape)}"
            )
        groups = -(-k // group_len(k, self.group_size))
        for name in ("scales", "zeros"):
            t = getattr(self, name)
            if t is not None and (tuple(t.shape) != (n, groups) or t.device != self.device):
                raise ValueError(
                    f"W4Weight: {name} must be [{n}, {groups}] on {self.device} (group_size "
                    f"{self.group_size}), got {list(t.shape)} on {t.device}"
                )

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

    def stored_codes(self) -> torch.Tensor:
        """uint8 [N, K] codes as stored: q with zero points, q + 8 when symmetric."""
        return unpack(self.packed, self.layout, self.shape[1])

    @property
    def codes(self) -> torch.Tensor:
        """The rule's codes [N, K]: uint8 0..15 with zero points, int8 -8..7 without."""
        stored = self.stored_codes()
        return stored if self.zero_point else (stored.to(torch.int8) - SYMMETRIC_ZERO)

    def dequantize(self) -> torch.Tensor:
        """W_hat [N, K] = (q - zero) * scale in the original weight's dtype, on this device;
        a value past that dtype's largest finite one saturates there."""
        # Looked up by name: the op is declared by this package's __init__, which imports us.
        w_hat = torch.ops.ferrograd.w4_dequantize(
            self.packed, self.scales, self.zeros, self.shape[1], self.group_size, self.layout
        )
        # A code stands for up to a step past its group's range (rounding, and the widening to
        # hold 0): near a 16-bit type's largest value that would round to inf.
        if torch.finfo(self.dtype).bits < 32:
            largest = torch.finfo(self.dtype).max
            w_hat = w_hat.clamp(-largest, largest)
        return w_hat.to(self.dtype)

    def with_layout(self, layout: str) -> W4Weight:
        """The same weight with its codes packed in ``layout`` (on the same device)."""
        _check_layout(layout)
        if layout == self.layout:
            return self
        packed = convert(self.packed, self.layout, layout, self.shape[1])
        return dataclasses.replace(self, packed=packed, layout=layout)

    def to(self, device: torch.device | str) -> W4Weight:
        """The same weight on ``device``, in that device's layout (``native_layout``)."""
        device = torch.device(device)
        layout = native_layout(device)
        # Repack on the accelerator's side of the move: torch ops there are the faster.
        w = self if self.device.type == "cpu" else self.with_layout(layout)
        if w.device != device:
            zeros = None if w.zeros is None else w.zeros.to(device)
            w = dataclasses.replace(
                w, packed=w.packed.to(device), scales=w.scales.to(device), zeros=zeros
            )
        return w.with_layout(layout)

    def __reduce__(self):
        # Pickled as its constructor's arguments, so loading runs the constructor's checks: a
        # file whose packed codes disagree with its shape raises instead of reaching a kernel
        # (the default reduce would fill the fields in unchecked).
        return (W4Weight, tuple(getattr(self, f.name) for f in dataclasses.fields(self)))

    def __repr__(self) -> str:
        return (
            f"W4Weight(shape={tuple(self.shape)}, group_size={self.group_size}, "
            f"zero_point={self.zero_point}, scales={self.scales.dtype}, layout={self.layout!r}, "
            f"device={self.device})"
        )
