"""ShiftQuant (DESIGN.md section 5): sub-8-bit integer codes, one float32 scale per row and a
power-of-two shift per group along the last axis, and the integer GEMM on them.

The Rust kernels do the work on CPU tensors, kernels/shiftquant.cu on CUDA tensors (the same
codes, scales and shifts bit for bit; see ops/shiftquant_cuda.py); other devices raise
NotImplementedError. A row holding NaN or infinity quantizes to scale NaN (codes 0), so NaN
spreads to everything that row touches in ``dequantize`` and ``shiftquant_matmul`` (as it would
in float arithmetic; torch.amp's GradScaler then sees a non-finite gradient and skips the step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import _core
from ._checks import check_floating, check_tensor

__all__ = ["ShiftQuantTensor", "shiftquant", "shiftquant_matmul"]

_ROUNDINGS = ("nearest", "stochastic")


def check_device(op: str, name: str, t: torch.Tensor) -> None:
    if t.device.type not in ("cpu", "cuda"):
        raise NotImplementedError(
            f"{op}: {name} is on {t.device}; ferrograd's ShiftQuant runs on CPU and CUDA tensors"
        )


def check_spec(op: str, bits: object, group_size: object) -> None:
    for name, v in (("bits", bits), ("group_size", group_size)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{op}: {name} must be an int, got {type(v).__name__}")
    if not 2 <= bits <= 8:
        raise ValueError(f"{op}: bits must be in 2..8, got {bits}")
    if group_size <= 0 or group_size % 4:
        raise ValueError(f"{op}: group_size must be a positive multiple of 4, got {group_size}")


def seed_tensor() -> torch.Tensor:
    """A seed from torch's default generator (torch.manual_seed makes runs repeatable), as a
    0-d tensor so that torch.compile can trace drawing it."""
    return torch.randint(0, 2**62, (), dtype=torch.int64)


def _draw_seed() -> int:
    return int(seed_tensor())


@dataclass(frozen=True)
class ShiftQuantTensor:
    """A tensor quantized along its last axis.

    ``codes`` int8 [..., K] in [-qmax, qmax] (qmax = 2^(bits-1) - 1), ``scale`` float32 [...]
    (one per row), ``shifts`` uint8 [..., ceil(K / group_size)]; element value
    ``codes * scale * 2^-shift``.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    shifts: torch.Tensor
    bits: int
    group_size: int

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    def dequantize(self) -> torch.Tensor:
        """The float32 values the codes stand for."""
        check_device("ShiftQuantTensor.dequantize", "codes", self.codes)
        if self.codes.is_cuda:
            return _dequantize_torch(self)
        out = torch.empty(self.codes.shape, dtype=torch.float32)
        _core.shiftquant_dequantize(
            self.codes.contiguous(),
            self.scale.contiguous(),
            self.shifts.contiguous(),
            self.group_size,
            out,
        )
        return out


def element_shifts(q: ShiftQuantTensor) -> torch.Tensor:
    """The shift of every code (int32, the shape of ``q.codes``)."""
    k = q.codes.shape[-1]
    return q.shifts.to(torch.int32).repeat_interleave(q.group_size, dim=-1)[..., :k]


def _dequantize_torch(q: ShiftQuantTensor) -> torch.Tensor:
    """codes * (scale * 2^-shift) in torch ops, rounded as the Rust kernel rounds."""
    # 2^-k from its bits: exact on any device.
    pow2 = ((127 - element_shifts(q)) << 23).view(torch.float32)
    return q.codes.float() * (q.scale.float()[..., None] * pow2)


def quantize_2d(
    x: torch.Tensor, bits: int, group_size: int, seed: int | None, transposed: bool = False
) -> ShiftQuantTensor:
    """Quantizes a matrix [R, C] along C, or with ``transposed`` along R (the result is then
    [C, R], exactly the quantization of x.T). ``seed`` None rounds to nearest."""
    if x.is_cuda:
        from . import shiftquant_cuda

        codes, scale, shifts = shiftquant_cuda.quantize(x, bits, group_size, seed, transposed)
        return ShiftQuantTensor(codes, scale, shifts, bits, group_size)
    x = x.detach()
    x = (x if x.dtype == torch.float32 else x.float()).contiguous()
    rows, length = x.shape
    if transposed:
        rows, length = length, rows
    codes = torch.empty((rows, length), dtype=torch.int8)
    scale = torch.empty(rows, dtype=torch.float32)
    shifts = torch.empty((rows, math.ceil(length / group_size)), dtype=torch.uint8)
    arrays = (x, codes, scale, shifts)
    _core.shiftquant_quantize(*arrays, length, bits, group_size, seed, transposed)
    return ShiftQuantTensor(codes, scale, shifts, bits, group_size)


def shiftquant(
    x: torch.Tensor,
    bits: int = 8,
    group_size: int = 64,
    rounding: str = "nearest",
    seed: int | None = None,
) -> ShiftQuantTensor:
    """Quantizes ``x`` (float32 / bfloat16 / float16 / float64, any shape) along its last dim.

    ``rounding="stochastic"`` rounds up with probability equal to the fractional part, from a
    counter-based generator keyed by ``seed`` (None: drawn from torch's default generator).
    """
    op = "shiftquant"
    check_tensor(op, "x", x)
    check_floating(op, "x", x)
    check_device(op, "x", x)
    check_spec(op, bits, group_size)
    if rounding not in _ROUNDINGS:
        raise ValueError(f"{op}: rounding must be 'nearest' or 'stochastic', got {rounding!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"{op}: seed must be an int or None, got {type(seed).__name__}")
    if rounding == "stochastic":
        seed = _draw_seed() if seed is None else seed % 2**64
    else:
        seed = None
    if x.dim() == 0:
        x = x.reshape(1)
    shape = x.shape
    q = quantize_2d(x.reshape(-1, shape[-1]), bits, group_size, seed)
    return ShiftQuantTensor(
        q.codes.reshape(shape),
        q.scale.reshape(shape[:-1]),
        q.shifts.reshape(*shape[:-1], q.shifts.shape[-1]),
        bits,
        group_size,
    )


def matmul_2d(
    a: ShiftQuantTensor,
    b: ShiftQuantTensor,
    bias: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """[M, N] = a @ b.T (+ bias) for 2-D operands quantized along K, in ``dtype`` (on CUDA the
    kernel's epilogue rounds to it; the CPU kernel writes float32, then converts)."""
    if a.codes.is_cuda:
        from . import shiftquant_cuda as sqc

        a_op, b_op = (sqc.gemm_operand(q.codes, q.scale, q.shifts, q.group_size) for q in (a, b))
        return sqc.matmul(a_op, b_op, bias, dtype)
    m, k = a.codes.shape
    out = torch.empty((m, b.codes.shape[0]), dtype=torch.float32)
    operands = [t.contiguous() for t in (a.codes, a.scale, a.shifts)]
    operands += [t.contiguous() for t in (b.codes, b.scale, b.shifts)]
    bias = None if bias is None else bias.detach().float().contiguous()
    _core.shiftquant_matmul(*operands, k, a.group_size, out, bias)
    return out.to(dtype)


def _check_cuda_operand(op: str, name: str, q: ShiftQuantTensor) -> None:
    """What the GEMM kernel assumes of an operand (it would read out of bounds otherwise)."""
    k = q.codes.shape[-1]
    groups = math.ceil(k / q.group_size) if q.group_size > 0 else -1
    want = {"codes": torch.int8, "scale": torch.float32, "shifts": torch.uint8}
    for field, dtype in want.items():
        t = getattr(q, field)
        if t.dtype != dtype or t.device != q.codes.device:
            raise TypeError(f"{op}: {name}.{field} must be {dtype} on {q.codes.device}")
    if tuple(q.scale.shape) != tuple(q.codes.shape[:-1]) or tuple(q.shifts.shape) != (
        *q.codes.shape[:-1],
        groups,
    ):
        raise ValueError(
            f"{op}: {name} has codes {tuple(q.codes.shape)}, scale {tuple(q.scale.shape)} and "
            f"shifts {tuple(q.shifts.shape)}, inconsistent for groups of {q.group_size}"
        )
    if q.shifts.numel() and int(q.shifts.max()) > 15:
        raise ValueError(f"{op}: {name}.shifts must be in 0..=15")


def shiftquant_matmul(a_q: ShiftQuantTensor, b_q: ShiftQuantTensor) -> torch.Tensor:
    """float32 ``a @ b.T`` in integer arithmetic: a [..., K] and b [N, K], both quantized along
    K with the same group size. Equals the product of the dequantized operands up to float32
    rounding."""
    op = "shiftquant_matmul"
    for name, q in (("a_q", a_q), ("b_q", b_q)):
        if not isinstance(q, ShiftQuantTensor):
            raise TypeError(f"{op}: {name} must be a ShiftQuantTensor, got {type(q).__name__}")
        check_device(op, name, q.codes)
    if b_q.codes.dim() != 2:
        raise ValueError(f"{op}: b_q must be 2-D [N, K], got shape {tuple(b_q.codes.shape)}")
    if a_q.codes.dim() < 1 or a_q.codes.shape[-1] != b_q.codes.shape[-1]:
        raise ValueError(
            f"{op}: K differs: a_q is {tuple(a_q.codes.shape)}, b_q is {tuple(b_q.codes.shape)}"
        )
    if a_q.group_size != b_q.group_size:
        raise ValueError(
            f"{op}: group sizes differ: a_q uses {a_q.group_size}, b_q uses {b_q.group_size}"
        )
    if a_q.codes.device != b_q.codes.device:
        raise ValueError(
            f"{op}: a_q is on {a_q.codes.device}, b_q on {b_q.codes.device}; they must match"
        )
    if a_q.codes.is_cuda:  # the Rust kernel checks its operands itself
        for name, q in (("a_q", a_q), ("b_q", b_q)):
            _check_cuda_operand(op, name, q)
    lead = a_q.codes.shape[:-1]
    k = a_q.codes.shape[-1]
    a2 = ShiftQuantTensor(
        a_q.codes.reshape(-1, k),
        a_q.scale.reshape(-1),
        a_q.shifts.reshape(-1, a_q.shifts.shape[-1]),
        a_q.bits,
        a_q.group_size,
    )
    return matmul_2d(a2, b_q).reshape(*lead, b_q.codes.shape[0])
