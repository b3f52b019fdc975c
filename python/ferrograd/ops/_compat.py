"""The private torch functions the op layer calls, with the fallbacks that the older torch
releases pyproject.toml accepts need (docs/ops.md, "Torch and Python versions")."""

from __future__ import annotations

import torch

__all__ = ["any_requires_grad"]


def _any_requires_grad(*args) -> bool:
    """torch._C._any_requires_grad of torch 2.8 and later (2.5 to 2.7 lack it): whether a
    tensor among ``args``, or in a list among them, requires grad. Tuples are not looked into,
    as there; a list that does not start with a tensor is, where torch's answers False."""
    for a in args:
        if isinstance(a, torch.Tensor):
            if a.requires_grad:
                return True
        elif type(a) is list and any(isinstance(t, torch.Tensor) and t.requires_grad for t in a):
            return True
    return False


any_requires_grad = getattr(torch._C, "_any_requires_grad", _any_requires_grad)
