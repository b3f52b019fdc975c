"""Softmax and log-softmax in plain torch ops: the tests' oracle and the kernel of every device
and dtype the Rust kernels do not take (float64, CUDA, ...)."""

from __future__ import annotations

import torch


def forward(x: torch.Tensor, dim: int, log: bool) -> torch.Tensor:
    return torch.log_softmax(x, dim) if log else torch.softmax(x, dim)


def backward(y: torch.Tensor, grad: torch.Tensor, dim: int, log: bool) -> torch.Tensor:
    """The input gradient from the output y: grad - exp(y) * sum(grad) for log-softmax,
    y * (grad - sum(grad * y)) for softmax."""
    if log:
        return torch._log_softmax_backward_data(grad, y, dim, y.dtype)
    return torch._softmax_backward_data(grad, y, dim, y.dtype)
