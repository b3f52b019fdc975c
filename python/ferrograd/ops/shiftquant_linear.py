"""The ShiftQuant linear layer as torch custom ops: all three GEMMs of forward and backward run
in the integer kernel.

Forward: y = Q(x) · Q(W)ᵀ + b with activations and weights rounded to nearest (``bits``).
Backward, each operand quantized along that GEMM's reduction axis:
dX = Q_sr(dY) · Q(Wᵀ)ᵀ (reduction over out_features) and dW = Q_sr(dYᵀ) · Q(Xᵀ)ᵀ (reduction
over tokens), where Q_sr rounds stochastically with ``grad_bits``. The transposed operands are
quantized straight from the row-major tensors, with no transposed float copy.

Registered with ``torch.library.custom_op`` so that ``torch.compile`` treats them as opaque ops.
CPU tensors run the Rust kernels, CUDA tensors kernels/shiftquant.cu (whose GEMM epilogue writes
the output dtype directly); the quantizers read bfloat16 / float16 as they are.
"""

from __future__ import annotations

import torch

from ._checks import check_floating, check_tensor
from .shiftquant import check_device, check_spec, matmul_2d, quantize_2d, seed_tensor

__all__ = ["shiftquant_linear"]


@torch.library.custom_op("ferrograd::shiftquant_linear", mutates_args=())
def _linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
    grad_bits: int,
    group_size: int,
) -> torch.Tensor:
    # grad_bits is only read by the backward; it is an argument so that the op carries it.
    lead, k = x.shape[:-1], x.shape[-1]
    qx = quantize_2d(x.reshape(-1, k), bits, group_size, None)
    qw = quantize_2d(weight, bits, group_size, None)
    y = matmul_2d(qx, qw, bias, x.dtype)
    return y.reshape(*lead, weight.shape[0])


@_linear.register_fake
def _(x, weight, bias, bits, grad_bits, group_size):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("ferrograd::shiftquant_linear_backward", mutates_args=())
def _linear_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bits: int,
    grad_bits: int,
    group_size: int,
    seed: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # The seed comes as a tensor drawn from torch's generator, so that tracing stays symbolic.
    seed = int(seed)
    n, k = weight.shape
    dy = grad.reshape(-1, n)
    x2 = x.reshape(-1, k)
    # dX [T, K] = dY [T, N] · W [N, K]: reduce over N.
    q_dy = quantize_2d(dy, grad_bits, group_size, seed)
    q_wt = quantize_2d(weight, bits, group_size, None, transposed=True)
    dx = matmul_2d(q_dy, q_wt, None, x.dtype).reshape(x.shape)
    # dW [N, K] = dYᵀ [N, T] · X [T, K]: reduce over T.
    q_dyt = quantize_2d(dy, grad_bits, group_size, seed + 1, transposed=True)
    q_xt = quantize_2d(x2, bits, group_size, None, transposed=True)
    dw = matmul_2d(q_dyt, q_xt, None, weight.dtype)
    return dx, dw, dy.sum(0, dtype=torch.float32).to(weight.dtype)


@_linear_backward.register_fake
def _(grad, x, weight, bits, grad_bits, group_size, seed):
    return torch.empty_like(x), torch.empty_like(weight), weight.new_empty(weight.shape[0])


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, bits, grad_bits, group_size = inputs
    ctx.save_for_backward(x, weight)
    ctx.bits, ctx.grad_bits, ctx.group_size = bits, grad_bits, group_size
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    dx, dw, db = _linear_backward(
        grad.contiguous(), x, weight, ctx.bits, ctx.grad_bits, ctx.group_size, seed_tensor()
    )
    return dx, dw, db if ctx.has_bias else None, None, None, None


_linear.register_autograd(_backward, setup_context=_setup_context)


def shiftquant_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    bits: int = 8,
    grad_bits: int | None = None,
    group_size: int = 64,
) -> torch.Tensor:
    """``x @ weight.T + bias`` with ShiftQuant integer GEMMs in forward and backward."""
    op = "shiftquant_linear"
    check_tensor(op, "x", x)
    check_floating(op, "x", x)
    grad_bits = bits if grad_bits is None else grad_bits
    check_spec(op, bits, group_size)
    check_spec(op, grad_bits, group_size)
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is not None:
            check_device(op, name, t)
            if t.device != x.device:
                raise ValueError(f"{op}: {name} is on {t.device}, x on {x.device}")
    if x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{op}: x's last dim must be in_features={weight.shape[1]}, got shape {tuple(x.shape)}"
        )
    return _linear(x, weight, bias, bits, grad_bits, group_size)
