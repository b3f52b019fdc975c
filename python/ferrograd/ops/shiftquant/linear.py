"""The ShiftQuant linear layer's three integer GEMMs, over one kernel set (the ``quantize`` and
``matmul`` of cpu.py, cuda.py or reference.py): each device runs its own kernels back to back,
without a dispatcher round trip per step.

Forward: y = Q(x) · Q(W)ᵀ + b with activations and weights rounded to nearest (``bits``).
Backward, each operand quantized along that GEMM's reduction axis:
dX = Q_sr(dY) · Q(Wᵀ)ᵀ (reduction over out_features) and dW = Q_sr(dYᵀ) · Q(Xᵀ)ᵀ (reduction
over tokens), where Q_sr rounds stochastically with ``grad_bits``, keyed by ``seed`` and
``seed + 1``. The transposed operands are quantized straight from the row-major tensors, with
no transposed float copy. The quantized operands live in workspace slots 0 (left) and 1 (right)
where the kernel set keeps them (cpu.py): each GEMM consumes its pair before the slots are
filled again.

``weight_codes`` hands in Q(W) (and ``weight_codes_t`` Q(Wᵀ)) made earlier by the same rule from
the same weight, as ShiftQuantLinear's weight-codes cache does (nn/shiftquant.py): per
operand codes, scale, shifts and the GEMM's packed layout of them (``weight_operand``; empty
where the kernel set has none). The layer then neither quantizes nor packs the weight.
"""

from __future__ import annotations

import functools
from types import ModuleType

import torch

from . import kept


def forward(
    kernels: ModuleType,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
    grad_bits: int,
    group_size: int,
    dtype: torch.dtype | None = None,
    weight_codes: list[torch.Tensor] | None = None,
    keep_codes: bool = False,
) -> torch.Tensor:
    """x [..., K] @ weight [N, K].T + bias in ``dtype`` (None: x's). ``grad_bits`` is the
    backward's: the op carries it so that its autograd formula finds it. ``keep_codes``
    (without ``weight_codes``) takes Q(W) as kept.py keeps it for this weight."""
    lead, k = x.shape[:-1], x.shape[-1]
    dtype = dtype or x.dtype
    if keep_codes and not weight_codes and kept.can_keep(weight):
        make = functools.partial(weight_operand, kernels)
        weight_codes = kept.forward_codes(weight, bits, group_size, make)
    qx = kernels.quantize(x.reshape(-1, k), bits, group_size, None, False, slot=0)
    codes = weight_codes[:4] if weight_codes else None
    # A float64 output gets its bias in float64, after the GEMM: added inside it, the bias
    # would be rounded to float32 with the product (a fuzz case: y ~ bias off by 2.5e-9).
    late = dtype == torch.float64 and bias is not None
    y = _times_weight(
        kernels, qx, (weight, codes), bits, group_size, False, None if late else bias, dtype
    )
    if late:
        y = y + bias.to(torch.float64)
    return y.reshape(*lead, weight.shape[0])


def backward(
    kernels: ModuleType,
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bits: int,
    grad_bits: int,
    group_size: int,
    seed: int,
    weight_codes_t: list[torch.Tensor] | None = None,
    output_mask: tuple[bool, bool, bool] = (True, True, True),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dX (x's dtype and shape), dW and db (weight's dtype) from the output gradient; those
    ``output_mask`` leaves out are empty tensors, and their quantizations and GEMM are not
    run (a frozen weight skips dW's, an input without a gradient dX's). dX and dW round with
    seeds of their own, so either is the same bits with or without the other."""
    n, k = weight.shape
    rows = x.shape[:-1].numel()  # spelled out: reshape cannot infer -1 when N is 0
    dy = grad.reshape(rows, n)
    dx = x.new_empty(0)
    dw, db = weight.new_empty(0), weight.new_empty(0)
    if output_mask[0]:
        # dX [T, K] = dY [T, N] · W [N, K]: reduce over N.
        q_dy = kernels.quantize(dy, grad_bits, group_size, seed, False, slot=0)
        w = (weight, weight_codes_t)
        dx = _times_weight(kernels, q_dy, w, bits, group_size, True, None, x.dtype)
        dx = dx.reshape(x.shape)
    if output_mask[1] or output_mask[2]:
        # dW [N, K] = dYᵀ [N, T] · X [T, K]: reduce over T.
        # The bias gradient (dY's column sums) comes from the same read of dY.
        q_dyt, sums = kernels.quantize_with_col_sums(
            dy, grad_bits, group_size, (seed + 1) % 2**64, slot=0
        )
        if output_mask[1]:
            q_xt = kernels.quantize(x.reshape(rows, k), bits, group_size, None, True, slot=1)
            dw = kernels.matmul(*q_dyt, *q_xt, group_size, None, weight.dtype)
        if output_mask[2]:
            db = sums.to(weight.dtype)
    return dx, dw, db


def weight_operand(
    kernels: ModuleType,
    weight: torch.Tensor,
    bits: int,
    group_size: int,
    transposed: bool = False,
) -> list[torch.Tensor]:
    """Q(W) (or Q(Wᵀ)) as ``weight_codes`` takes it: codes, scale, shifts and, where the kernel
    set packs operands (cpu.py), the packed layout (else an empty tensor)."""
    q = kernels.quantize(weight.detach(), bits, group_size, None, transposed)
    pack = getattr(kernels, "pack_weight", None)
    packed = pack(*q, group_size) if pack else q[0].new_empty(0, dtype=torch.uint8)
    return [*q, packed]


def _times_weight(kernels, qa, weight, bits, group_size, transposed, bias, dtype) -> torch.Tensor:
    """qa @ Q(W).T (Q(Wᵀ) with ``transposed``), ``weight`` being (W, its ``weight_operand`` or
    None): the operand made earlier, or W quantized here into workspace slot 1."""
    w, codes = weight
    if not codes:
        qw = kernels.quantize(w, bits, group_size, None, transposed, slot=1)
        return kernels.matmul(*qa, *qw, group_size, bias, dtype)
    q, scale, shifts, packed = codes
    extra = {"packed_b": packed} if packed.numel() else {}
    return kernels.matmul(*qa, q, scale, shifts, group_size, bias, dtype, **extra)
