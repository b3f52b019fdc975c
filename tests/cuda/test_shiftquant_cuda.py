"""kernels/shiftquant.cu on a GPU: codes, scales and shifts bit-identical to the CPU kernels, the
integer GEMM against the float64 product of the dequantized operands, ShiftQuantLinear and
L1LayerNorm against their CPU paths, and a training step of a small Transformer."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

import ferrograd as fg
from ferrograd import cuda as fgcuda
from ferrograd.ops.shiftquant import quantize_2d

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from test_shiftquant import TinyTransformer, dequantized, motif_batch  # noqa: E402

pytestmark = pytest.mark.skipif(not fgcuda.is_available(), reason="needs a CUDA GPU")


def sample(shape, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    return x * torch.logspace(-3, 1, shape[-1])[torch.randperm(shape[-1], generator=g)]


def assert_same_quantization(gpu, cpu):
    assert torch.equal(gpu.codes.cpu(), cpu.codes)
    assert torch.equal(gpu.shifts.cpu(), cpu.shifts)
    torch.testing.assert_close(gpu.scale.cpu(), cpu.scale, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("bits", [2, 4, 6, 8])
@pytest.mark.parametrize("group_size", [4, 12, 64, 256])
@pytest.mark.parametrize("k", [1, 37, 64, 1000, 4096])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_codes_equal_the_cpu_kernels(bits, group_size, k, rounding):
    x = sample((9, k), k)
    kw = dict(bits=bits, group_size=group_size, rounding=rounding, seed=123)
    assert_same_quantization(fg.shiftquant(x.cuda(), **kw), fg.shiftquant(x, **kw))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_are_read_as_they_are(dtype):
    x = sample((5, 300), 1).to(dtype)
    kw = dict(bits=6, group_size=32, rounding="stochastic", seed=5)
    assert_same_quantization(fg.shiftquant(x.cuda(), **kw), fg.shiftquant(x.float(), **kw))


@pytest.mark.parametrize("shape", [(64, 32), (1001, 70), (37, 5), (4096, 33)])
@pytest.mark.parametrize("group_size", [4, 64, 600])
@pytest.mark.parametrize("seed", [None, 9])
def test_transposed_quantization_equals_the_cpu_kernels(shape, group_size, seed):
    x = sample(shape, 2)
    gpu = quantize_2d(x.cuda(), 5, group_size, seed, transposed=True)
    assert_same_quantization(gpu, quantize_2d(x, 5, group_size, seed, transposed=True))


def test_special_rows_and_magnitudes():
    x = sample((6, 130), 3)
    x[1] = 0.0
    x[2, 7] = float("nan")
    x[3, 100] = float("-inf")
    x[4] *= 1e-38  # denormal groups
    x[5] *= 3e36
    for transposed in (False, True):
        xs = x.T.contiguous() if transposed else x
        gpu = quantize_2d(xs.cuda(), 8, 16, None, transposed)
        assert_same_quantization(gpu, quantize_2d(xs, 8, 16, None, transposed))


@pytest.mark.parametrize(
    "m, n, k, group_size",
    [
        (1, 8, 64, 64),
        (77, 300, 1000, 64),
        (256, 256, 4096, 128),
        (130, 129, 96, 32),
        (50, 40, 200, 48),
    ],
)
@pytest.mark.parametrize("bias", [False, True])
def test_gemm_equals_the_float64_product(m, n, k, group_size, bias):
    qa = fg.shiftquant(sample((m, k), 4).cuda(), bits=8, group_size=group_size)
    qb = fg.shiftquant(sample((n, k), 5).cuda(), bits=6, group_size=group_size)
    c = torch.randn(n, device="cuda") if bias else None
    got = fg.ops.shiftquant.matmul_2d(qa, qb, c).double()
    da, db = dequantized(qa), dequantized(qb)
    want, bound = da @ db.T, da.abs() @ db.abs().T
    if c is not None:
        want, bound = want + c.double(), bound + c.double().abs()
    assert ((got - want).abs() <= 1e-5 * bound + 1e-30).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gemm_epilogue_rounds_to_the_output_dtype(dtype):
    qa = fg.shiftquant(sample((100, 512), 6).cuda())
    qb = fg.shiftquant(sample((72, 512), 7).cuda())
    f32 = fg.ops.shiftquant.matmul_2d(qa, qb)
    low = fg.ops.shiftquant.matmul_2d(qa, qb, None, dtype)
    assert low.dtype == dtype
    assert torch.equal(low, f32.to(dtype))


def test_public_matmul_and_leading_dims():
    a = sample((2, 3, 256), 8).cuda()
    qb = fg.shiftquant(sample((10, 256), 9).cuda())
    out = fg.shiftquant_matmul(fg.shiftquant(a), qb)
    want = fg.shiftquant_matmul(fg.shiftquant(a.cpu()), fg.shiftquant(sample((10, 256), 9)))
    assert out.shape == (2, 3, 10)
    torch.testing.assert_close(out.cpu(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shiftquant_linear_matches_the_cpu_path(dtype):
    torch.manual_seed(0)
    cpu = fg.nn.ShiftQuantLinear(256, 192, bits=6).to(dtype)
    gpu = copy.deepcopy(cpu).cuda()
    x = sample((4, 33, 256), 10).to(dtype)
    grad = torch.randn(4, 33, 192).to(dtype)
    results = []
    for layer, dev in ((cpu, "cpu"), (gpu, "cuda")):
        xi = x.to(dev).requires_grad_()
        torch.manual_seed(1)  # the same stochastic-rounding seeds on both devices
        y = layer(xi)
        y.backward(grad.to(dev))
        results.append([t.float().cpu() for t in (y, xi.grad, layer.weight.grad, layer.bias.grad)])
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    for ours, cpu_value in zip(*results[::-1], strict=True):
        torch.testing.assert_close(ours, cpu_value, **tol)


@pytest.mark.parametrize("bits", [None, 8])
def test_l1_layer_norm_matches_the_cpu_path(bits):
    x = sample((64, 512), 11).requires_grad_()
    norm = fg.nn.L1LayerNorm(512, bits=bits)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_()
    grad = torch.randn(64, 512)
    outs = []
    for dev in ("cpu", "cuda"):
        layer = copy.deepcopy(norm).to(dev)
        xi = x.detach().to(dev).requires_grad_()
        y = layer(xi)
        y.backward(grad.to(dev))
        outs.append([t.cpu() for t in (y, xi.grad, layer.weight.grad, layer.bias.grad)])
    for gpu_value, cpu_value in zip(outs[1], outs[0], strict=True):
        torch.testing.assert_close(gpu_value, cpu_value, rtol=1e-4, atol=1e-4)


def test_a_training_step_matches_the_cpu_path():
    """Attention differs in its last bits between the devices, which may flip a code here and
    there: the loss and the direction of every parameter's update must still agree."""
    torch.manual_seed(0)
    cpu = fg.nn.quantize_model(TinyTransformer(), bits=8)
    gpu = copy.deepcopy(cpu).cuda()
    before = [p.detach().clone() for p in cpu.parameters()]
    ids = motif_batch(torch.Generator().manual_seed(1))
    losses = []
    for model, dev in ((cpu, "cpu"), (gpu, "cuda")):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        torch.manual_seed(2)
        batch = ids.to(dev)
        logits = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 16), batch[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert abs(losses[0] - losses[1]) <= 1e-4 * losses[0]
    params = zip(cpu.named_parameters(), gpu.parameters(), before, strict=True)
    for (name, p_cpu), p_gpu, p0 in params:
        du_cpu, du_gpu = (p_cpu.detach() - p0).flatten(), (p_gpu.detach().cpu() - p0).flatten()
        cos = torch.nn.functional.cosine_similarity(du_cpu, du_gpu, dim=0)
        assert cos >= 0.999, name


def test_bad_input_on_cuda():
    qa = fg.shiftquant(torch.randn(4, 64, device="cuda"))
    qb = fg.shiftquant(torch.randn(3, 64))
    with pytest.raises(ValueError, match="shiftquant_matmul: a_q is on cuda"):
        fg.shiftquant_matmul(qa, qb)
    bad = fg.ops.shiftquant.ShiftQuantTensor(qa.codes, qa.scale, qa.shifts + 20, 8, 64)
    with pytest.raises(ValueError, match="shifts must be in 0..=15"):
        fg.shiftquant_matmul(qa, bad)
    short = fg.ops.shiftquant.ShiftQuantTensor(qa.codes, qa.scale[:2], qa.shifts, 8, 64)
    with pytest.raises(ValueError, match="inconsistent"):
        fg.shiftquant_matmul(qa, short)
    layer = fg.nn.ShiftQuantLinear(64, 8)
    with pytest.raises(ValueError, match="shiftquant_linear: weight is on cpu"):
        layer(torch.randn(2, 64, device="cuda"))
