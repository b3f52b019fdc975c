"""ShiftQuant (docs/definitions.md): sub-8-bit integer codes, one float32 scale per row and a
power-of-two shift per group along the last axis; the integer GEMM on them; the linear layer
whose three GEMMs (forward, dX, dW) run on codes.

Ops, each with a CPU kernel (Rust, cpu.py), a CUDA kernel where kernels/shiftquant.cu has one
(cuda.py) and the same rule in torch ops for every other backend (reference.py):

- ``ferrograd::shiftquant_quantize(x, bits, group_size, seed, transposed)``: codes, scale,
  shifts of a matrix along its rows (or its columns); ``seed`` a 0-d int64 tensor keys the
  stochastic rounding (None rounds to nearest);
- ``ferrograd::shiftquant_dequantize``: the float32 values of codes (reference kernel on CUDA);
- ``ferrograd::shiftquant_matmul``: a @ b.T (+ bias) of two operands quantized along K;
- ``ferrograd::shiftquant_linear`` and its backward (linear.py), differentiable.

A row holding NaN or infinity quantizes to scale NaN (codes 0), so NaN spreads to everything that
row touches in ``dequantize`` and ``shiftquant_matmul`` (as it would in float arithmetic;
torch.amp's GradScaler then sees a non-finite gradient and skips the step).

Other primitives use this package through ``quantize_2d``, ``matmul_2d``, ``element_shifts``,
``check_spec`` and ``check_device`` only.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .. import _library
from .._checks import as_int, check_floating, check_tensor
from .._compat import any_requires_grad
from . import cpu, cuda, kept, linear, reference
from .reference import element_shifts

__all__ = [
    "ShiftQuantTensor",
    "check_device",
    "check_spec",
    "element_shifts",
    "kept",
    "linear_with_codes",
    "matmul_2d",
    "quantize_2d",
    "seed_tensor",
    "shiftquant",
    "shiftquant_linear",
    "shiftquant_matmul",
    "weight_operand",
]

_ROUNDINGS = ("nearest", "stochastic")


def check_device(op: str, name: str, t: torch.Tensor) -> None:
    if t.device.type not in ("cpu", "cuda"):
        raise NotImplementedError(
            f"{op}: {name} is on {t.device}; ferrograd's ShiftQuant runs on CPU and CUDA tensors"
        )


def check_spec(
    op: str,
    bits: object,
    group_size: object,
    bits_name: str = "bits",
    group_name: str = "group_size",
) -> tuple[int, int]:
    """bits in 2..8 and group_size a positive multiple of 4, as ints; the names are how the
    messages call the arguments (``grad_bits``, ``b_q.group_size``)."""
    bits, group_size = as_int(op, bits_name, bits), as_int(op, group_name, group_size)
    if not 2 <= bits <= 8:
        raise ValueError(f"{op}: {bits_name} must be in 2..8, got {bits}")
    if not 0 < group_size < 2**62 or group_size % 4:
        raise ValueError(
            f"{op}: {group_name} must be a positive multiple of 4 below 2^62, got {group_size}"
        )
    return bits, group_size


def seed_tensor(seed: int | None = None) -> torch.Tensor:
    """The stochastic rounding's seed as a 0-d int64 tensor: ``seed`` (taken modulo 2^64, stored
    with the same 64 bits), or with None a draw from torch's default generator (torch.manual_seed
    makes runs repeatable) that torch.compile traces as a random op."""
    if seed is None:
        return torch.randint(0, 2**62, (), dtype=torch.int64)
    return torch.tensor((seed + 2**63) % 2**64 - 2**63, dtype=torch.int64)


# ---- ops ----


def _rounding_key(seed: torch.Tensor | None) -> int | None:
    return None if seed is None else int(seed) % 2**64


def _quantize_kernel(kernels, x, bits, group_size, seed, transposed):
    return kernels.quantize(x, bits, group_size, _rounding_key(seed), transposed)


def _linear_backward_kernel(
    kernels,
    grad,
    x,
    weight,
    bits,
    grad_bits,
    group_size,
    seed,
    weight_codes_t=None,
    output_mask=(True, True, True),
):
    key = _rounding_key(seed)
    return linear.backward(
        kernels, grad, x, weight, bits, grad_bits, group_size, key, weight_codes_t,
        tuple(output_mask),
    )  # fmt: skip


def _kernels(rule):
    """The CPU, CUDA and reference kernels of an op whose rule is written over a kernel set."""
    return {
        "cpu": functools.partial(rule, cpu),
        "cuda": functools.partial(rule, cuda),
        "reference": functools.partial(rule, reference),
    }


def _fake_quantize(x, bits, group_size, seed, transposed):
    rows, length = (x.shape[1], x.shape[0]) if transposed else (x.shape[0], x.shape[1])
    return (
        x.new_empty((rows, length), dtype=torch.int8),
        x.new_empty(rows, dtype=torch.float32),
        x.new_empty((rows, -(-length // group_size)), dtype=torch.uint8),
    )


def _fake_dequantize(codes, scale, shifts, group_size):
    return codes.new_empty(codes.shape, dtype=torch.float32)


def _fake_matmul(a_codes, a_scale, a_shifts, b_codes, b_scale, b_shifts, group_size, bias, dtype):
    return a_codes.new_empty((a_codes.shape[0], b_codes.shape[0]), dtype=dtype)


def _fake_linear(
    x, weight, bias, bits, grad_bits, group_size, dtype=None, weight_codes=None, keep_codes=False
):
    return x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=dtype or x.dtype)


def _fake_linear_backward(
    grad, x, weight, bits, grad_bits, group_size, seed, weight_codes_t=None,
    output_mask=(True, True, True),
):  # fmt: skip
    shapes = (x.shape, weight.shape, weight.shape[:1])
    return tuple(
        like.new_empty(shape if wanted else (0,))
        for like, shape, wanted in zip((x, weight, weight), shapes, output_mask, strict=True)
    )


quantize_op = _library.define(
    "shiftquant_quantize(Tensor x, int bits, int group_size, Tensor? seed, bool transposed)"
    " -> (Tensor, Tensor, Tensor)",
    **_kernels(_quantize_kernel),
    fake=_fake_quantize,
)
dequantize_op = _library.define(
    "shiftquant_dequantize(Tensor codes, Tensor scale, Tensor shifts, int group_size) -> Tensor",
    cpu=cpu.dequantize,
    reference=reference.dequantize,
    fake=_fake_dequantize,
)
matmul_op = _library.define(
    "shiftquant_matmul(Tensor a_codes, Tensor a_scale, Tensor a_shifts, Tensor b_codes, "
    "Tensor b_scale, Tensor b_shifts, int group_size, Tensor? bias, ScalarType dtype) -> Tensor",
    cpu=cpu.matmul,
    cuda=cuda.matmul,
    reference=reference.matmul,
    fake=_fake_matmul,
)
linear_op = _library.define(
    "shiftquant_linear(Tensor x, Tensor weight, Tensor? bias, int bits, int grad_bits, "
    "int group_size, ScalarType? dtype=None, Tensor[]? weight_codes=None, "
    "bool keep_codes=False) -> Tensor",
    **_kernels(linear.forward),
    fake=_fake_linear,
)
linear_backward_op = _library.define(
    "shiftquant_linear_backward(Tensor grad, Tensor x, Tensor weight, int bits, int grad_bits, "
    "int group_size, Tensor seed, Tensor[]? weight_codes_t=None, "
    "bool[3] output_mask=[True, True, True]) -> (Tensor, Tensor, Tensor)",
    **_kernels(_linear_backward_kernel),
    fake=_fake_linear_backward,
)


def _setup_linear(ctx, inputs, output) -> None:
    x, weight, bias, ctx.bits, ctx.grad_bits, ctx.group_size, _, codes, _ = inputs
    # x is read only for dW. Without it (a frozen weight) the node keeps a one-element stand-in
    # of x's dtype and device and x's shape, as torch's linear keeps its input only for the
    # weight's gradient: a frozen layer does not hold its input alive.
    ctx.x_shape = None if ctx.needs_input_grad[1] else x.shape
    kept = x if ctx.x_shape is None else x.new_empty(())
    # Q(W) and, when cached, Q(Wᵀ) (ShiftQuantLinear's cache): the backward takes the latter.
    ctx.save_for_backward(kept, weight, *(codes or [])[4:])
    ctx.has_bias = bias is not None


def _linear_backward(ctx, grad):
    x, weight, *codes_t = ctx.saved_tensors
    if ctx.x_shape is not None:
        x = x.expand(ctx.x_shape)  # the stand-in: shape and dtype for dX, no data read
    # Only the gradients autograd asks for: a frozen weight skips dW's quantizations and GEMM.
    need = ctx.needs_input_grad
    mask = [need[0], need[1], need[2] and ctx.has_bias]
    dx, dw, db = _library.call(
        linear_backward_op,
        grad,
        x,
        weight,
        ctx.bits,
        ctx.grad_bits,
        ctx.group_size,
        seed_tensor(),
        codes_t or None,
        mask,
    )
    dx, dw, db = (t if wanted else None for t, wanted in zip((dx, dw, db), mask, strict=True))
    return dx, dw, db, None, None, None, None, None, None


_library.register_autograd(linear_op, _linear_backward, _setup_linear)


# ---- public functions ----


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
        _check_operand("ShiftQuantTensor.dequantize", None, self)
        return _library.call(dequantize_op, self.codes, self.scale, self.shifts, self.group_size)


def quantize_2d(
    x: torch.Tensor,
    bits: int,
    group_size: int,
    seed: int | torch.Tensor | None = None,
    transposed: bool = False,
) -> ShiftQuantTensor:
    """Quantizes a matrix [R, C] along C, or with ``transposed`` along R (the result is then
    [C, R], exactly the quantization of x.T). ``seed`` (an int or a 0-d int64 tensor) rounds
    stochastically; None rounds to nearest. Not differentiable."""
    if seed is not None and not isinstance(seed, torch.Tensor):
        seed = seed_tensor(seed)
    codes, scale, shifts = _library.call(
        quantize_op, x.detach(), bits, group_size, seed, transposed
    )
    return ShiftQuantTensor(codes, scale, shifts, bits, group_size)


def matmul_2d(
    a: ShiftQuantTensor,
    b: ShiftQuantTensor,
    bias: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """[M, N] = a @ b.T (+ bias) for 2-D operands quantized along K, in ``dtype`` (on CUDA the
    kernel's epilogue rounds to it; the CPU kernel writes float32, then converts)."""
    bias = None if bias is None else bias.detach()
    return _library.call(
        matmul_op, a.codes, a.scale, a.shifts, b.codes, b.scale, b.shifts, a.group_size, bias, dtype
    )


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
    bits, group_size = check_spec(op, bits, group_size)
    if rounding not in _ROUNDINGS:
        raise ValueError(f"{op}: rounding must be 'nearest' or 'stochastic', got {rounding!r}")
    if seed is not None:
        seed = as_int(op, "seed", seed)
    key = seed_tensor(seed) if rounding == "stochastic" else None
    if x.dim() == 0:
        x = x.reshape(1)
    shape = x.shape
    # Rows spelled out: reshape cannot infer -1 when the last dim is 0.
    q = quantize_2d(x.reshape(shape[:-1].numel(), shape[-1]), bits, group_size, key)
    return ShiftQuantTensor(
        q.codes.reshape(shape),
        q.scale.reshape(shape[:-1]),
        q.shifts.reshape(*shape[:-1], q.shifts.shape[-1]),
        bits,
        group_size,
    )


_FIELD_DTYPES = {"codes": torch.int8, "scale": torch.float32, "shifts": torch.uint8}


def _check_operand(op: str, name: str | None, q: ShiftQuantTensor) -> None:
    """What the kernels assume of a quantized tensor (``name``: how the message calls it, None
    for its fields alone); the CUDA GEMM would read out of bounds."""
    label = "" if name is None else f"{name}."
    for field in _FIELD_DTYPES:
        t = getattr(q, field)
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {label}{field} must be a torch.Tensor, got {type(t).__name__}")
    check_device(op, f"{label}codes", q.codes)
    for field, dtype in _FIELD_DTYPES.items():
        t = getattr(q, field)
        if t.dtype != dtype or t.device != q.codes.device:
            raise TypeError(
                f"{op}: {label}{field} must be {dtype} on {q.codes.device}, got {t.dtype} on "
                f"{t.device}"
            )
    check_spec(op, q.bits, q.group_size, f"{label}bits", f"{label}group_size")
    k = q.codes.shape[-1] if q.codes.dim() else -1
    groups = -(-k // q.group_size)
    if (
        k < 0
        or tuple(q.scale.shape) != tuple(q.codes.shape[:-1])
        or tuple(q.shifts.shape)
        != (
            *q.codes.shape[:-1],
            groups,
        )
    ):
        raise ValueError(
            f"{op}: {name or 'the tensor'} has codes {tuple(q.codes.shape)}, scale "
            f"{tuple(q.scale.shape)} and shifts {tuple(q.shifts.shape)}, inconsistent for groups "
            f"of {q.group_size}"
        )
    # Data, so eager only (the CPU kernel checks it again; the CUDA one trusts it).
    if not torch.compiler.is_compiling() and q.shifts.numel() and int(q.shifts.max()) > 15:
        raise ValueError(f"{op}: {label}shifts must be in 0..=15")


def shiftquant_matmul(a_q: ShiftQuantTensor, b_q: ShiftQuantTensor) -> torch.Tensor:
    """float32 ``a @ b.T`` in integer arithmetic: a [..., K] and b [N, K], both quantized along
    K with the same group size. Equals the product of the dequantized operands up to float32
    rounding."""
    op = "shiftquant_matmul"
    for name, q in (("a_q", a_q), ("b_q", b_q)):
        if not isinstance(q, ShiftQuantTensor):
            raise TypeError(f"{op}: {name} must be a ShiftQuantTensor, got {type(q).__name__}")
        _check_operand(op, name, q)
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
    lead = a_q.codes.shape[:-1]
    k = a_q.codes.shape[-1]
    a2 = ShiftQuantTensor(
        a_q.codes.reshape(lead.numel(), k),
        a_q.scale.reshape(-1),
        a_q.shifts.reshape(lead.numel(), a_q.shifts.shape[-1]),
        a_q.bits,
        a_q.group_size,
    )
    return matmul_2d(a2, b_q).reshape(*lead, b_q.codes.shape[0])


def shiftquant_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    bits: int = 8,
    grad_bits: int | None = None,
    group_size: int = 64,
) -> torch.Tensor:
    """``x @ weight.T + bias`` with ShiftQuant integer GEMMs in forward and backward
    (linear.py); differentiable towards x, weight and bias. The result has x's dtype, or under
    autocast (as nn.Linear) the autocast dtype; x is quantized as it is, without a cast."""
    return linear_with_codes(x, weight, bias, bits, grad_bits, group_size, None)


def weight_operand(
    weight: torch.Tensor, bits: int, group_size: int, transposed: bool = False
) -> list[torch.Tensor]:
    """Q(W) (or Q(Wᵀ)) of a weight [N, K] as ``linear_with_codes`` takes it, made by the
    kernels of the weight's device (linear.weight_operand)."""
    kernels = {"cpu": cpu, "cuda": cuda}.get(weight.device.type, reference)
    with torch.no_grad():
        return linear.weight_operand(kernels, weight, bits, group_size, transposed)


def linear_with_codes(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
    grad_bits: int | None,
    group_size: int,
    weight_codes: list[torch.Tensor] | None,
    keep_codes: bool = False,
) -> torch.Tensor:
    """``shiftquant_linear`` with the weight's codes made earlier (ShiftQuantLinear's cache):
    ``weight_operand(weight, ...)`` and, for the backward, optionally the transposed one after
    it; None quantizes the weight in the call, or with ``keep_codes`` (a call without
    gradients, under torch.compile) takes Q(W) as kept for this weight by kept.py."""
    if weight_codes and _inference_on_cpu(x, weight, bias):
        # Evaluation and decoding with kept codes: the op's CPU kernel straight away, as
        # `_library.call` would run it, without re-checking what made the codes (3-5 us of
        # a 512 -> 1376 layer's 55 at one token, on Zen 4).
        dtype = _out_dtype(x)
        return linear.forward(cpu, x, weight, bias, bits, bits, group_size, dtype, weight_codes)
    op = "shiftquant_linear"
    check_tensor(op, "x", x)
    check_floating(op, "x", x)
    grad_bits = bits if grad_bits is None else grad_bits
    bits, group_size = check_spec(op, bits, group_size)
    grad_bits, _ = check_spec(op, grad_bits, group_size, "grad_bits")
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is not None:
            check_device(op, name, t)
            if t.device != x.device:
                raise ValueError(f"{op}: {name} is on {t.device}, x on {x.device}")
    if x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{op}: x's last dim must be in_features={weight.shape[1]}, got shape {tuple(x.shape)}"
        )
    if x.shape[-1] == 0:  # no products to quantize: zeros (+ bias), as nn.Linear gives
        bias = None if bias is None else bias.to(x.dtype)
        return torch.nn.functional.linear(x, weight.to(x.dtype), bias)
    dtype = _out_dtype(x)
    return _library.call(
        linear_op, x, weight, bias, bits, grad_bits, group_size, dtype, weight_codes, keep_codes
    )


def _inference_on_cpu(x: object, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether a call runs eagerly on plain CPU tensors (``_library.eager_cpu``), wants no
    gradient and has an x that the op takes (floating point, last dim in_features > 0)."""
    return (
        type(x) is torch.Tensor
        and x.is_floating_point()
        and x.dim() > 0
        and x.shape[-1] == weight.shape[1] > 0
        and weight.is_cpu
        and (bias is None or bias.is_cpu)
        and _library.eager_cpu((x, weight, bias))
        and not (torch.is_grad_enabled() and any_requires_grad(x, weight, bias))
    )


def _out_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The autocast dtype where autocast would run nn.Linear on x in it (float64 stays), else
    None (x's dtype)."""
    device = "cpu" if x.is_cpu else x.device.type  # (is_cpu: a tenth of device.type's cost)
    if not torch.is_autocast_enabled(device) or x.dtype == torch.float64:
        return None
    return torch.get_autocast_dtype(device)
