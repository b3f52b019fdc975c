"""L1 LayerNorm (docs/definitions.md):
y = (x - mean) / (sqrt(pi/2) * mean|x - mean| + eps) * weight + bias over the normalized dims.

Ops on x [..., n] (rows: every leading dim; the codes path [rows, n]), differentiable towards
x, weight and bias:

- ``ferrograd::l1_norm(x, weight, bias, eps)``: y (x's dtype) and the per-row mean and
  1 / (sqrt(pi/2) * mean|x - mean| + eps) it saves; float64 runs in float64, other dtypes in
  float32 (float32 statistics), so gradcheck works;
- ``ferrograd::l1_norm_codes(x, codes, scale, shifts, group_size, weight, bias, eps)``: the same
  from ShiftQuant codes of x, statistics exact in integers; the backward treats the quantization
  as the identity (straight-through to x) and reads the codes, so the layer saves int8 instead of
  float activations;

with their ``_backward`` ops.

L1 RMSNorm: y = x / (sqrt(pi/2) * mean|x| + eps) * weight over the last dim, differentiable towards
x and weight: ``ferrograd::l1_rms_norm(x, weight, eps)`` (y and the per-row
1 / (sqrt(pi/2) * mean|x| + eps) it saves, dtypes as above) and its ``_backward``.

CPU tensors run the Rust kernels (cpu.py: float32, bfloat16 and float16 natively, float64 in
reference.py), every other device the same rule in torch ops (reference.py); on CUDA the codes
come from kernels/shiftquant.cu. docs/l1norm.md has the design and the measurements.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

from .. import _library
from .._checks import as_dtype, check_floating, check_number, check_tensor, compute_dtype
from ..shiftquant import check_device, check_spec, quantize_2d
from . import cpu, reference

__all__ = ["check_eps", "check_normalized_shape", "l1_layer_norm", "l1_rms_norm"]

#: Group size of the codes path.
CODES_GROUP_SIZE = 64
_MAX_FLOAT = 1.7976931348623157e308  # eps must be finite


def _fake(x, weight, bias, eps):
    kd = compute_dtype(x.dtype)
    rows = reference.rows(x)
    return x.new_empty(x.shape), x.new_empty(rows, dtype=kd), x.new_empty(rows, dtype=kd)


def _fake_codes(x, codes, scale, shifts, group_size, weight, bias, eps):
    rows = codes.shape[0]
    f32 = torch.float32
    return x.new_empty(codes.shape), x.new_empty(rows, dtype=f32), x.new_empty(rows, dtype=f32)


def _fake_grads(grad, mean, weight_grad, bias_grad):
    n = grad.shape[-1]
    return (
        grad.new_empty(grad.shape),
        mean.new_empty(n if weight_grad else 0),
        mean.new_empty(n if bias_grad else 0),
    )


def _fake_backward(grad, x, mean, rstd, weight, weight_grad, bias_grad):
    return _fake_grads(grad, mean, weight_grad, bias_grad)


def _fake_backward_codes(
    grad, codes, scale, shifts, group_size, mean, rstd, weight, weight_grad, bias_grad
):
    return _fake_grads(grad, mean, weight_grad, bias_grad)


l1_norm_op = _library.define(
    "l1_norm(Tensor x, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor)",
    cpu=cpu.forward,
    reference=reference.forward,
    fake=_fake,
)
l1_norm_backward_op = _library.define(
    "l1_norm_backward(Tensor grad, Tensor x, Tensor mean, Tensor rstd, Tensor? weight, "
    "bool weight_grad, bool bias_grad) -> (Tensor, Tensor, Tensor)",
    cpu=cpu.backward,
    reference=reference.backward,
    fake=_fake_backward,
)
l1_norm_codes_op = _library.define(
    "l1_norm_codes(Tensor x, Tensor codes, Tensor scale, Tensor shifts, int group_size, "
    "Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor)",
    cpu=cpu.forward_codes,
    reference=reference.forward_codes,
    fake=_fake_codes,
)
l1_norm_codes_backward_op = _library.define(
    "l1_norm_codes_backward(Tensor grad, Tensor codes, Tensor scale, Tensor shifts, "
    "int group_size, Tensor mean, Tensor rstd, Tensor? weight, bool weight_grad, "
    "bool bias_grad) -> (Tensor, Tensor, Tensor)",
    cpu=cpu.backward_codes,
    reference=reference.backward_codes,
    fake=_fake_backward_codes,
)


def _fake_rms(x, weight, eps):
    rstd = x.new_empty(reference.rows(x), dtype=compute_dtype(x.dtype))
    return x.new_empty(x.shape), rstd


def _fake_rms_backward(grad, x, rstd, weight, weight_grad):
    return grad.new_empty(grad.shape), rstd.new_empty(x.shape[-1] if weight_grad else 0)


l1_rms_norm_op = _library.define(
    "l1_rms_norm(Tensor x, Tensor? weight, float eps) -> (Tensor, Tensor)",
    cpu=cpu.rms_forward,
    reference=reference.rms_forward,
    fake=_fake_rms,
)
l1_rms_norm_backward_op = _library.define(
    "l1_rms_norm_backward(Tensor grad, Tensor x, Tensor rstd, Tensor? weight, bool weight_grad) "
    "-> (Tensor, Tensor)",
    cpu=cpu.rms_backward,
    reference=reference.rms_backward,
    fake=_fake_rms_backward,
)


def _setup_params(ctx, weight, bias, output, weight_at: int) -> None:
    """What both backwards need of the parameters (``weight_at``: weight's input index; bias
    follows it); the statistics are outputs nothing trains."""
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    _no_zero_grads(ctx)
    ctx.weight_dtype = None if weight is None else weight.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.weight_at = weight_at


def _no_zero_grads(ctx) -> None:
    """The backward gets None, not a tensor of zeros, for the statistics (no gradient ever
    reaches them) and for y where none reached it: the two zero tensors autograd made for mean
    and rstd at every backward cost about 5 us of a [8, 256] forward + backward (80 us)."""
    ctx.set_materialize_grads(False)


def _wanted(ctx) -> tuple[bool, bool]:
    """Whether dweight and dbias are asked for."""
    needs = ctx.needs_input_grad
    return (
        ctx.weight_dtype is not None and needs[ctx.weight_at],
        ctx.bias_dtype is not None and needs[ctx.weight_at + 1],
    )


def _param_grads(ctx, wanted: tuple[bool, bool], dw, db):
    """dweight and dbias in the parameters' dtypes, None where not asked for."""
    return (
        as_dtype(dw, ctx.weight_dtype) if wanted[0] else None,
        as_dtype(db, ctx.bias_dtype) if wanted[1] else None,
    )


def _setup(ctx, inputs, output) -> None:
    x, weight, bias, ctx.eps = inputs
    _setup_params(ctx, weight, bias, output, 1)
    ctx.save_for_backward(x, output[1], output[2], weight)


def _backward(ctx, grad, _mean, _rstd):
    if grad is None:  # (no gradient reached y)
        return None, None, None, None
    x, mean, rstd, weight = ctx.saved_tensors
    wanted = _wanted(ctx)
    dx, dw, db = _library.call(l1_norm_backward_op, grad, x, mean, rstd, weight, *wanted)
    return dx, *_param_grads(ctx, wanted, dw, db), None


def _setup_codes(ctx, inputs, output) -> None:
    _, codes, scale, shifts, ctx.group_size, weight, bias, _ = inputs
    _setup_params(ctx, weight, bias, output, 5)
    ctx.save_for_backward(codes, scale, shifts, output[1], output[2], weight)


def _backward_codes(ctx, grad, _mean, _rstd):
    if grad is None:  # (no gradient reached y)
        return (None,) * 8
    codes, scale, shifts, mean, rstd, weight = ctx.saved_tensors
    wanted = _wanted(ctx)
    dx, dw, db = _library.call(
        l1_norm_codes_backward_op,
        grad,
        codes,
        scale,
        shifts,
        ctx.group_size,
        mean,
        rstd,
        weight,
        *wanted,
    )
    # Straight-through: the codes' gradient goes to x.
    return dx, None, None, None, None, *_param_grads(ctx, wanted, dw, db), None


def _setup_rms(ctx, inputs, output) -> None:
    x, weight, ctx.eps = inputs
    ctx.mark_non_differentiable(output[1])
    _no_zero_grads(ctx)
    ctx.weight_dtype = None if weight is None else weight.dtype
    ctx.save_for_backward(x, output[1], weight)


def _backward_rms(ctx, grad, _rstd):
    if grad is None:  # (no gradient reached y)
        return None, None, None
    x, rstd, weight = ctx.saved_tensors
    weight_grad = ctx.weight_dtype is not None and ctx.needs_input_grad[1]
    dx, dw = _library.call(l1_rms_norm_backward_op, grad, x, rstd, weight, weight_grad)
    return dx, as_dtype(dw, ctx.weight_dtype) if weight_grad else None, None


# With create_graph=True: the forward recomputed in reference.py's torch ops and
# differentiated by torch, so that the gradients carry their own graph (the bias gradient, a
# sum of grad, directly). The codes path has none: its x is gone (only the codes are saved).
def _differentiable_backward(ctx, grad, _mean, _rstd):
    x, _, _, weight = ctx.saved_tensors
    dx, dw = _library.recomputed_grads(
        lambda x, w: reference.forward(x, w, None, ctx.eps)[0], (x, weight), grad
    )
    db = grad.reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype) if _wanted(ctx)[1] else None
    return dx, dw, db, None


def _differentiable_backward_rms(ctx, grad, _rstd):
    x, _, weight = ctx.saved_tensors
    dx, dw = _library.recomputed_grads(
        lambda x, w: reference.rms_forward(x, w, ctx.eps)[0], (x, weight), grad
    )
    return dx, dw, None


_library.register_autograd(
    l1_norm_op, _backward, _setup, differentiable_backward=_differentiable_backward
)
_library.register_autograd(
    l1_rms_norm_op, _backward_rms, _setup_rms, differentiable_backward=_differentiable_backward_rms
)
_library.register_autograd(l1_norm_codes_op, _backward_codes, _setup_codes)


def check_eps(op: str, eps: object) -> float:
    """eps as a float: a positive finite number (0 divides a constant row's 0 by 0)."""
    if type(eps) is float and 0.0 < eps <= _MAX_FLOAT:  # the common case, without ABC checks
        return eps
    if isinstance(eps, numbers.Real) and not isinstance(eps, bool):
        eps = float(eps)  # numpy's floats too
    value = check_number(op, "eps", eps, 0.0, _MAX_FLOAT)
    if value == 0:
        raise ValueError(f"{op}: eps must be > 0, got {eps}")
    return value


def check_normalized_shape(op: str, shape: object) -> tuple[int, ...]:
    """An int or a sequence of ints >= 0 (numpy's too), as a tuple."""
    if type(shape) is tuple and all(type(d) is int and d >= 0 for d in shape):
        return shape  # the modules' own, checked once: no ABC checks per call
    dims = (shape,) if isinstance(shape, numbers.Integral) else shape
    if isinstance(dims, (str, bytes)) or not isinstance(dims, (Sequence, torch.Size)):
        raise TypeError(
            f"{op}: normalized_shape must be an int or a sequence of ints, got {shape!r}"
        )
    if not all(isinstance(d, numbers.Integral) and not isinstance(d, bool) for d in dims):
        raise TypeError(f"{op}: normalized_shape must hold ints, got {shape!r}")
    if any(d < 0 for d in dims):
        raise ValueError(f"{op}: normalized_shape must not be negative, got {shape!r}")
    return tuple(int(d) for d in dims)


def l1_layer_norm(
    x: torch.Tensor,
    normalized_shape: tuple[int, ...],
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    bits: int | None = None,
) -> torch.Tensor:
    """L1 LayerNorm of ``x`` over its trailing ``normalized_shape`` dims (see module doc); with
    ``bits``, from ShiftQuant codes of x (nearest, groups of 64 along the normalized dims)."""
    op = "l1_layer_norm"
    check_tensor(op, "x", x)
    check_floating(op, "x", x)
    eps = check_eps(op, eps)
    if bits is not None:
        check_device(op, "x", x)
        bits, _ = check_spec(op, bits, CODES_GROUP_SIZE)
    shape = check_normalized_shape(op, normalized_shape)
    one = len(shape) == 1  # one normalized dim: weight, bias and x need no reshape
    if (
        not shape
        or x.dim() < len(shape)
        or (x.shape[-1] != shape[0] if one else x.shape[x.dim() - len(shape) :] != shape)
    ):
        raise ValueError(
            f"{op}: x's trailing dims must be normalized_shape={shape}, got {tuple(x.shape)}"
        )
    n = math.prod(shape)
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None:
            if p.shape != shape:
                raise ValueError(f"{op}: {name} must have shape {shape}, got {tuple(p.shape)}")
            if p.device != x.device:
                raise ValueError(f"{op}: {name} is on {p.device}, x on {x.device}")
    w = weight if weight is None or one else weight.reshape(n)
    b = bias if bias is None or one else bias.reshape(n)
    if x.numel() == 0:
        return x.clone()
    if bits is None:
        # The op takes x [..., n] as it is: its output is then a tensor of x's shape, not a
        # view of one (FSDP2 warns of views leaving a module: an in-place op on one would
        # skip its hooks). Several normalized dims are flattened into one.
        xn = x if one else x.reshape(*x.shape[: x.dim() - len(shape)], n)
        y = _library.call(l1_norm_op, xn, w, b, float(eps))[0]
        return y if one else y.reshape(x.shape)
    x2 = x.reshape(-1, n)
    q = quantize_2d(x2, bits, CODES_GROUP_SIZE)
    y = _library.call(
        l1_norm_codes_op, x2, q.codes, q.scale, q.shifts, CODES_GROUP_SIZE, w, b, float(eps)
    )[0]
    return y.reshape(x.shape)


def l1_rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    *,
    bits: int | None = None,
) -> torch.Tensor:
    """L1 RMSNorm of ``x`` over its last dim (see module doc). With ``bits``, the statistic and
    the output come from x's ShiftQuant codes (nearest, groups of 64 along the last dim), their
    dequantized values (float32, float64 for float64 x; the output rounded to x's dtype once);
    the gradient passes straight through to x."""
    op = "l1_rms_norm"
    check_tensor(op, "x", x)
    check_floating(op, "x", x)
    eps = check_eps(op, eps)
    reference.check_rows(op, x)
    n = x.shape[-1]
    if weight is not None:
        if tuple(weight.shape) != (n,):
            raise ValueError(f"{op}: weight must have shape ({n},), got {tuple(weight.shape)}")
        if weight.device != x.device:
            raise ValueError(f"{op}: weight is on {weight.device}, x on {x.device}")
    if bits is not None:
        check_device(op, "x", x)
        bits, _ = check_spec(op, bits, CODES_GROUP_SIZE)
    if x.numel() == 0:
        return x.clone()
    if bits is None:
        return _library.call(l1_rms_norm_op, x, weight, float(eps))[0]  # x [..., n] as it is
    # The codes' values in float32, or float64 for float64 x (exact; rounded to a 16-bit x's
    # dtype they lost up to half a unit there, all of it for subnormals: a fuzz case), with x's
    # gradient; the output is rounded to x's dtype once.
    x2 = x.reshape(-1, n).to(torch.promote_types(x.dtype, torch.float32))
    codes = quantize_2d(x2, bits, CODES_GROUP_SIZE).dequantize().to(x2.dtype)
    x2 = codes + (x2 - x2.detach())
    y = _library.call(l1_rms_norm_op, x2, weight, float(eps))[0]
    return y.reshape(x.shape).to(x.dtype)
