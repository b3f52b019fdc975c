"""The public fg.linear_cross_entropy on a GPU (kernels/cce.cu behind it), by ml-cross-entropy's
criterion: elementwise |ref64 - ours| <= |ref64 - torch_in_dtype| + tol for the loss and every
gradient."""

import pytest
import torch
import torch.nn.functional as F

import ferrograd as fg

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def loss_and_grads(fn, e, c, bias, targets, dtype, **kw):
    leaves = [t.detach().to(dtype).requires_grad_() for t in (e, c, bias)]
    loss = fn(*leaves, targets, **kw)
    grads = torch.autograd.grad(loss, leaves)
    return [loss.detach().double(), *(g.double() for g in grads)]


def torch_loss(e, c, bias, targets, softcap=None, label_smoothing=0.0):
    z = e @ c.T + bias
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return F.cross_entropy(z.float() if z.dtype != torch.float64 else z, targets,
                           label_smoothing=label_smoothing)  # fmt: skip


def ours(e, c, bias, targets, **kw):
    return fg.linear_cross_entropy(e, c, targets, bias=bias, **kw)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("options", [{}, {"softcap": 20.0}, {"label_smoothing": 0.1}])
def test_matches_float64_as_well_as_torch_does(dtype, options):
    g = torch.Generator(device="cuda").manual_seed(0)
    n, d, v = 777, 256, 50_001  # nothing a multiple of a block
    e = torch.randn(n, d, device="cuda", generator=g)
    c = torch.randn(v, d, device="cuda", generator=g) / d**0.5
    bias = torch.randn(v, device="cuda", generator=g) * 0.1
    targets = torch.randint(0, v, (n,), device="cuda", generator=g)
    targets[::5] = -100
    ref = loss_and_grads(torch_loss, e, c, bias, targets, torch.float64, **options)
    base = loss_and_grads(torch_loss, e, c, bias, targets, dtype, **options)
    got = loss_and_grads(ours, e, c, bias, targets, dtype, **options)
    for r, b, o in zip(ref, base, got, strict=True):
        if dtype == torch.float32:  # both near float64: compare with it directly
            torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-5 * r.abs().max().item())
        else:  # computed in float32 from the same inputs: never worse than torch in dtype
            assert ((r - o).abs() <= (r - b).abs() + 1e-6 * r.abs().max()).all()
