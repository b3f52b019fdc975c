"""W4A16: 4-bit weights (round to nearest per group, docs/definitions.md) and the matmul of
16-bit activations with them, as ferrograd ops.

- ``ferrograd::w4_quantize(weight, group_size, zero_point)`` -> (packed codes in the
  ``cpu_blocks`` layout, float32 scales, stored zeros);
- ``ferrograd::w4_dequantize(packed, scales, zeros, k, group_size, layout)`` -> W_hat [N, K]
  float32;
- ``ferrograd::w4a16_matmul(x, packed, scales, zeros, group_size, layout)``: x [..., K] @ W_hat.T
  -> [..., N] in x's dtype, differentiable towards x (the weight is frozen) through
  ``ferrograd::w4a16_matmul_backward`` (grad @ W_hat, itself differentiable).

Kernels: cpu.py (Rust), cuda.py (kernels/w4a16.cu), reference.py (torch ops: every other device,
layout and dtype). The weight travels as a ``W4Weight`` value (weight.py, which defines the
layouts); the public functions unpack it into the ops' plain tensor arguments.
"""

from __future__ import annotations

import operator

import torch

from .. import _library
from .._checks import KERNEL_DTYPES, check_floating, check_tensor
from . import cpu, cuda, reference
from .weight import CPU_BLOCKS, W4Weight, check_x, group_len, packed_shape, store_scales

__all__ = ["W4Weight", "quantize_w4", "w4a16_linear", "w4a16_matmul"]

OP = "w4a16_matmul"
QUANTIZE_OP = "quantize_w4"


def _fake_quantize(weight, group_size, zero_point):
    n, k = weight.shape
    groups = -(-k // group_len(k, group_size))
    shape, dtype = packed_shape(n, k, CPU_BLOCKS)
    scales = weight.new_empty(n, groups, dtype=torch.float32)
    zeros = weight.new_empty(n, groups, dtype=torch.uint8)
    return weight.new_empty(shape, dtype=dtype), scales, zeros


def _fake_dequantize(packed, scales, zeros, k, group_size, layout):
    return scales.new_empty(packed.shape[0], k, dtype=torch.float32)


def _fake_matmul(x, packed, scales, zeros, k, group_size, layout):
    check_x(x, k)
    return x.new_empty(*x.shape[:-1], packed.shape[0])


def _fake_matmul_backward(grad, packed, scales, zeros, k, group_size, layout):
    return grad.new_empty(*grad.shape[:-1], k)


w4_quantize_op = _library.define(
    "w4_quantize(Tensor weight, int group_size, bool zero_point) -> (Tensor, Tensor, Tensor)",
    cpu=cpu.quantize,
    reference=reference.quantize,
    fake=_fake_quantize,
)
w4_dequantize_op = _library.define(
    "w4_dequantize(Tensor packed, Tensor scales, Tensor? zeros, int k, int group_size, "
    "str layout) -> Tensor",
    cpu=cpu.dequantize,
    reference=reference.dequantize,
    fake=_fake_dequantize,
)
w4a16_matmul_op = _library.define(
    "w4a16_matmul(Tensor x, Tensor packed, Tensor scales, Tensor? zeros, int k, int group_size, "
    "str layout) -> Tensor",
    cpu=cpu.matmul,
    cuda=cuda.matmul,
    reference=reference.matmul,
    fake=_fake_matmul,
)
w4a16_matmul_backward_op = _library.define(
    "w4a16_matmul_backward(Tensor grad, Tensor packed, Tensor scales, Tensor? zeros, int k, "
    "int group_size, str layout) -> Tensor",
    cpu=cpu.matmul_backward,
    reference=reference.matmul_backward,
    fake=_fake_matmul_backward,
)


def _setup_matmul(ctx, inputs, output) -> None:
    _, packed, scales, zeros, ctx.k, ctx.group_size, ctx.layout = inputs
    ctx.save_for_backward(packed, scales, zeros)


def _matmul_backward(ctx, grad: torch.Tensor):
    packed, scales, zeros = ctx.saved_tensors
    dx = _library.call(
        w4a16_matmul_backward_op, grad, packed, scales, zeros, ctx.k, ctx.group_size, ctx.layout
    )
    return dx, None, None, None, None, None, None


def _setup_backward(ctx, inputs, output) -> None:
    _, packed, scales, zeros, ctx.k, ctx.group_size, ctx.layout = inputs
    ctx.save_for_backward(packed, scales, zeros)


def _backward_backward(ctx, grad: torch.Tensor):
    packed, scales, zeros = ctx.saved_tensors
    dgrad = _library.call(
        w4a16_matmul_op, grad, packed, scales, zeros, ctx.k, ctx.group_size, ctx.layout
    )
    return dgrad, None, None, None, None, None, None


# Each backward is the other op, itself differentiable: any order of derivative works.
_library.register_autograd(
    w4a16_matmul_op, _matmul_backward, _setup_matmul, differentiable_backward=_matmul_backward
)
_library.register_autograd(
    w4a16_matmul_backward_op,
    _backward_backward,
    _setup_backward,
    differentiable_backward=_backward_backward,
)


def quantize_w4(weight: torch.Tensor, group_size: int = 128, zero_point: bool = True) -> W4Weight:
    """Quantizes ``weight`` [N, K] (any float dtype, any device; computed in float32 there) to 4
    bits by round to nearest per group of ``group_size`` input channels (-1: whole rows).

    Codes are computed with the float32 scale; the stored scale is float16 (bfloat16 for a
    bfloat16 weight) when every scale of the weight lies in that type's normal range, else
    float32 (weight.py's ``store_scales``), and ``dequantize()`` and the kernels use the stored
    one. With zero points a group whose range (widened to hold 0) overflows float32 is a
    ValueError. The weight comes back on ``weight``'s device in that device's layout."""
    check_tensor(QUANTIZE_OP, "weight", weight)
    check_floating(QUANTIZE_OP, "weight", weight)
    if weight.dim() != 2 or 0 in weight.shape:
        raise ValueError(
            f"{QUANTIZE_OP}: weight must be a non-empty 2-D [N, K] tensor, "
            f"got {tuple(weight.shape)}"
        )
    if isinstance(group_size, bool) or not hasattr(group_size, "__index__"):
        raise TypeError(
            f"{QUANTIZE_OP}: group_size must be an int, got {type(group_size).__name__}"
        )
    group_size = operator.index(group_size)  # numpy integers too, as torch takes them
    if group_size != -1 and not 0 < group_size < 2**63:
        raise ValueError(
            f"{QUANTIZE_OP}: group_size must be positive (below 2^63) or -1 (whole rows), "
            f"got {group_size}"
        )
    if not isinstance(zero_point, bool):
        raise TypeError(
            f"{QUANTIZE_OP}: zero_point must be a bool, got {type(zero_point).__name__}"
        )
    if type(weight) is torch.Tensor and weight.is_meta:  # (not a traced FakeTensor)
        raise ValueError(
            f"{QUANTIZE_OP}: weight is on the meta device and holds no values to quantize "
            "(load or initialize the weights first)"
        )
    # The CPU kernel refuses NaN and infinity itself, in its pass over the weight.
    kernel_checks = weight.is_cpu and weight.dtype in KERNEL_DTYPES
    if not (kernel_checks or torch.compiler.is_compiling() or bool(torch.isfinite(weight).all())):
        raise ValueError(f"{QUANTIZE_OP}: weight holds NaN or infinity")
    packed, scales, zeros = _library.call(w4_quantize_op, weight.detach(), group_size, zero_point)
    scales = store_scales(scales, weight.dtype)
    w = W4Weight(
        packed, scales, zeros if zero_point else None, weight.shape, group_size, weight.dtype
    )
    return w.to(weight.device)


def w4a16_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    shape: tuple[int, int],
    group_size: int,
    layout: str,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`w4a16_matmul` over the tensors of a weight of ``shape`` [N, K] (what
    ``fg.nn.W4A16Linear`` holds as buffers): checks, then the op."""
    check_tensor(OP, "x", x)
    check_floating(OP, "x", x)
    n, k = shape  # x's K: checked by the op's kernels (weight.check_x)
    if x.device != packed.device:
        raise ValueError(f"{OP}: x is on {x.device} but w is on {packed.device}")
    if bias is not None:
        check_tensor(OP, "bias", bias)
        if bias.shape != (n,) or bias.device != x.device:
            raise ValueError(f"{OP}: bias must have shape [N] = [{n}] on {x.device}, got "
                             f"{tuple(bias.shape)} on {bias.device}")  # fmt: skip
    if bias is not None and x.dtype == torch.float16 and x.device.type == "cpu":
        # The bias meets the float32 product before the one rounding to float16 (rounding
        # first turns a product past float16's range into inf even where the sum is finite).
        # On the CPU float16 x is widened for the kernels anyway, so this costs nothing.
        y = _library.call(w4a16_matmul_op, x.float(), packed, scales, zeros, k, group_size, layout)
        return (y + bias.float()).to(x.dtype)
    y = _library.call(w4a16_matmul_op, x, packed, scales, zeros, k, group_size, layout)
    return y if bias is None else y + bias.to(y.dtype)


def w4a16_matmul(x: torch.Tensor, w: W4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] (float16, bfloat16 or float32) @ W_hat.T (+ bias) -> [..., N] in x's dtype,
    differentiable towards x and bias. CPU: the Rust GEMV, AVX-512 GEMM or blocked
    dequantization (cpu.py); CUDA: kernels/w4a16.cu (cuda.py); elsewhere the reference."""
    if not isinstance(w, W4Weight):
        raise TypeError(
            f"{OP}: w must be a W4Weight (fg.quant.quantize_w4), got {type(w).__name__}"
        )
    return w4a16_linear(x, w.packed, w.scales, w.zeros, w.shape, w.group_size, w.layout, bias)
