"""What a layer built from another (``from_linear``, ``from_layer_norm``, ``from_rms_norm``)
takes over from it besides the values: its Parameters themselves, or their requires_grad."""

from __future__ import annotations

import torch
from torch import nn


def plain_parameters(module: nn.Module, names: tuple[str, ...]) -> bool:
    """Whether each of ``names`` is an nn.Parameter (or None) registered on ``module`` itself:
    not computed by a parametrization (torch.nn.utils.parametrize), whose result a new module
    cannot hold."""
    return not hasattr(module, "parametrizations") and all(
        name in module._parameters for name in names
    )


def frozen_as(out: nn.Module, source: nn.Module) -> nn.Module:
    """``out`` with each parameter's requires_grad as ``source``'s of the same name (a copy
    of a frozen layer stays frozen)."""
    for name, p in out.named_parameters(recurse=False):
        q = getattr(source, name, None)
        if isinstance(q, torch.Tensor):
            p.requires_grad_(q.requires_grad)
    return out
