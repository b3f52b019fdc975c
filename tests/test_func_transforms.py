"""torch.func transforms over ferrograd ops: vmap over every op (softmax by its batching rule,
the others by torch's per-sample fallback, which runs the CPU kernels on plain slices), grad /
jacrev / vmap(grad) where the backward has a derivative (torch.func differentiates with
create_graph=True), a clear error where not."""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import grad, jacrev, vmap

import ferrograd as fg

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop")


def _l1_layer_norm_f64(x, weight, bias, eps):
    d = x - x.mean(-1, keepdim=True)
    return d / (math.sqrt(math.pi / 2) * d.abs().mean(-1, keepdim=True) + eps) * weight + bias


@pytest.mark.filterwarnings("error:There is a performance drop")  # softmax has a vmap rule
@pytest.mark.parametrize("op", [fg.softmax, fg.log_softmax])
@pytest.mark.parametrize("dim", [-1, 1, 0])
def test_vmap_softmax_matches_the_unbatched_call(op, dim):
    x = torch.randn(3, 64, 512)
    for in_dims in (0, 1, 2):
        got = vmap(lambda t: op(t, dim), in_dims=in_dims)(x)
        want = torch.stack([op(t, dim) for t in x.unbind(in_dims)])
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_vmap_l1_norms_and_w4a16():
    x = torch.randn(4, 16, 256)
    for m in (fg.nn.L1LayerNorm(256), fg.nn.L1RMSNorm(256)):
        torch.testing.assert_close(vmap(m)(x), m(x), rtol=0, atol=0)
    w = fg.quant.quantize_w4(torch.randn(64, 256))
    rows = torch.randn(5, 256)
    torch.testing.assert_close(
        vmap(lambda r: fg.w4a16_matmul(r, w))(rows), fg.w4a16_matmul(rows, w), rtol=0, atol=0
    )


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_grad_and_jacrev_through_softmax_match_float64(name):
    x, c = torch.randn(4096) * 3, torch.randn(4096)
    ours, theirs = getattr(fg, name), getattr(torch, name)
    got = grad(lambda z: (ours(z) * c).sum())(x)
    want = grad(lambda z: (theirs(z, -1) * c.double()).sum())(x.double())
    # log_softmax's c - p Σc cancels: the error is float32's on Σc, not on the result.
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    x = torch.randn(64) * 3
    torch.testing.assert_close(
        jacrev(ours)(x).double(), jacrev(lambda z: theirs(z, -1))(x.double()), rtol=1e-5, atol=1e-7
    )


def test_per_sample_gradients_through_l1_layer_norm():
    """vmap(grad): each sample's weight gradient, against the definition in float64."""
    m = fg.nn.L1LayerNorm(128)
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.5, 0.5)
    x, target = torch.randn(6, 10, 128), torch.randn(6, 10, 128)
    params = {k: v.detach() for k, v in m.named_parameters()}

    def loss(p, x, t):
        return ((torch.func.functional_call(m, p, (x,)) - t) ** 2).sum()

    got = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, target)["weight"]
    w64, b64 = (params[k].double().requires_grad_() for k in ("weight", "bias"))
    for i in range(len(x)):
        y = _l1_layer_norm_f64(x[i].double(), w64, b64, m.eps)
        (want,) = torch.autograd.grad(((y - target[i].double()) ** 2).sum(), w64)
        torch.testing.assert_close(got[i].double(), want, rtol=1e-4, atol=1e-4)


def test_grad_refused_where_the_backward_has_no_derivative():
    e, c = torch.randn(512, 64), torch.randn(1024, 64)
    targets = torch.randint(0, 1024, (512,))
    with pytest.raises(NotImplementedError, match="linear_cross_entropy_fused: torch.func"):
        grad(lambda e: fg.linear_cross_entropy(e, c, targets))(e)
    layer = fg.nn.ShiftQuantLinear(64, 32)
    with pytest.raises(NotImplementedError, match="shiftquant_linear: torch.func"):
        grad(lambda x: layer(x).sum())(torch.randn(8, 64))
