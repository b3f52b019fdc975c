"""The CUDA ShiftQuant path on the CPU: the GEMM kernel's fragment decomposition emulated in torch
(with the kernel's own index expressions) against the float64 product of the dequantized
operands, the operand padding, and the torch-ops paths that CUDA tensors take (dequantize,
L1 LayerNorm) against the Rust kernels."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import ferrograd as fg
from ferrograd.ops import shiftquant_cuda as sqc
from ferrograd.ops.l1norm import _L1LayerNormTorch, l1_layer_norm
from ferrograd.ops.shiftquant import _dequantize_torch

KERNEL = Path(__file__).resolve().parent.parent / "kernels" / "shiftquant.cu"


def sample(shape, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * torch.logspace(-3, 1, shape[-1])


def dequantized(q) -> torch.Tensor:
    """codes * scale * 2^-shift in float64, written out independently of the kernels."""
    k = q.codes.shape[-1]
    pw = torch.repeat_interleave(2.0 ** -q.shifts.double(), q.group_size, dim=-1)[..., :k]
    return q.codes.double() * q.scale.double().unsqueeze(-1) * pw


def test_the_emulation_uses_the_kernels_index_expressions():
    source = KERNEL.read_text()
    for name, expression in sqc.KERNEL_INDEX.items():
        assert expression in source, f"{name}: {expression!r} is not in {KERNEL.name}"


@pytest.mark.parametrize(
    "m, n, k, group_size, bias",
    [
        (20, 136, 192, 64, True),  # N crosses a block, K ends mid-stage
        (130, 40, 100, 48, False),  # M crosses a block; groups padded 48 -> 64, short last group
        (33, 17, 96, 32, True),  # one group per mma step
        (9, 24, 72, 12, False),  # groups padded 12 -> 32
    ],
)
def test_emulated_gemm_equals_the_float64_product(m, n, k, group_size, bias):
    a, b = sample((m, k), 1), sample((n, k), 2)
    qa = fg.shiftquant(a, bits=8, group_size=group_size)
    qb = fg.shiftquant(b, bits=5, group_size=group_size)
    ops = [sqc.gemm_operand(q.codes, q.scale, q.shifts, q.group_size) for q in (qa, qb)]
    assert all(op.k % 32 == 0 and op.group_size % 32 == 0 for op in ops)
    c = torch.randn(n) if bias else None
    got = sqc.emulate_gemm(*ops, c)
    da, db = dequantized(qa), dequantized(qb)
    want = da @ db.T
    bound = da.abs() @ db.abs().T
    if c is not None:
        want, bound = want + c.double(), bound + c.double().abs()
    assert ((got.double() - want).abs() <= 1e-5 * bound + 1e-30).all()


def test_gemm_operand_padding_keeps_every_value():
    q = fg.shiftquant(sample((5, 100), 3), bits=6, group_size=20)
    op = sqc.gemm_operand(q.codes, q.scale, q.shifts, q.group_size)
    assert (op.k, op.group_size) == (5 * 32, 32)
    unpadded = op.codes.view(5, 5, 32)[:, :, :20].reshape(5, 100)
    assert torch.equal(unpadded, q.codes)
    assert (op.codes.view(5, 5, 32)[:, :, 20:] == 0).all()
    assert op.shifts_t.shape == (5, 16) and torch.equal(op.shifts_t[:, :5], q.shifts.T)


@pytest.mark.parametrize("group_size", [4, 12, 32, 64, 128, 1024])
def test_rows_plan(group_size):
    threads, lanes = sqc.rows_plan(4096, group_size)
    assert threads % 32 == 0 and threads <= 256
    assert lanes & (lanes - 1) == 0 and lanes <= min(32, group_size // 4)
    assert sqc.rows_plan(10, group_size)[0] == 32


def test_torch_dequantize_equals_the_rust_kernel():
    q = fg.shiftquant(sample((7, 150), 4), bits=4, group_size=16)
    assert torch.equal(_dequantize_torch(q), q.dequantize())


def test_torch_l1_layer_norm_follows_the_rust_kernels():
    x = sample((6, 96), 5).requires_grad_()
    w = (torch.rand(96) + 0.5).requires_grad_()
    b = torch.randn(96, requires_grad=True)
    grad = torch.randn(6, 96)
    for bits in (None, 8):
        outs = []
        for y in (
            l1_layer_norm(x, (96,), w, b, 1e-5, bits=bits),
            _L1LayerNormTorch.apply(x, w, b, 96, 1e-5, bits),
        ):
            outs.append((y, *torch.autograd.grad(y, (x, w, b), grad)))
        for ours, theirs in zip(*outs, strict=True):
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_torch_l1_layer_norm_gradcheck():
    x = torch.randn(3, 10, dtype=torch.float64, requires_grad=True)
    w = torch.rand(10, dtype=torch.float64, requires_grad=True)
    b = torch.randn(10, dtype=torch.float64, requires_grad=True)
    norm = lambda *t: _L1LayerNormTorch.apply(*t, 10, 1e-5, None)  # noqa: E731
    assert torch.autograd.gradcheck(norm, (x, w, b))
