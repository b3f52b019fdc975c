"""kernels/w4a16.cu on a GPU against the dequantized weight (Marlin's criterion)."""

import pytest
import torch

import ferrograd as fg
from ferrograd import cuda as fgcuda

pytestmark = pytest.mark.skipif(not fgcuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("m", [1, 7, 16, 33, 128])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("zero_point", [True, False])
@pytest.mark.parametrize("dtype, tol", [(torch.float16, 1e-3), (torch.bfloat16, 8e-3)])
def test_kernel_matches_the_dequantized_weight(m, group_size, zero_point, dtype, tol):
    g = torch.Generator(device="cuda").manual_seed(m)
    n, k = 1000, 2048  # N not a multiple of the 128-column block
    w = torch.randn(n, k, device="cuda", generator=g).to(dtype)
    q = fg.quant.quantize_w4(w, group_size, zero_point)
    x = torch.randn(m, k, device="cuda", generator=g).to(dtype)
    got = fg.w4a16_matmul(x, q)
    assert got.dtype == dtype and got.shape == (m, n)
    ref = x.float() @ q.dequantize().float().T
    assert ((got.float() - ref).abs().mean() / ref.abs().mean()).item() < tol


def test_gradient_and_bias_on_cuda():
    q = fg.quant.quantize_w4(torch.randn(256, 512, device="cuda").half(), 128)
    x = torch.randn(4, 512, device="cuda", dtype=torch.float16, requires_grad=True)
    bias = torch.randn(256, device="cuda", dtype=torch.float16)
    y = fg.w4a16_matmul(x, q, bias)
    y.float().sum().backward()
    want = torch.ones(4, 256, device="cuda", dtype=torch.float16) @ q.dequantize()
    torch.testing.assert_close(x.grad, want, rtol=1e-2, atol=1e-2)
