"""CUDA tensors: fg.softmax falls back to torch and keeps autograd."""

import pytest
import torch

import ferrograd as fg

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_softmax_matches_torch(dtype):
    x = torch.randn(64, 1000, device="cuda", dtype=dtype, requires_grad=True)
    y = fg.softmax(x, -1)
    torch.testing.assert_close(y, torch.softmax(x, -1))
    y.sum().backward()
    assert x.grad is not None and x.grad.device.type == "cuda"
    torch.testing.assert_close(fg.log_softmax(x, 0), torch.log_softmax(x, 0))
