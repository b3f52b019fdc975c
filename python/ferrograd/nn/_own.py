"""A layer's own tensors, read on its per-call path."""

from __future__ import annotations

from torch import nn


def own(module: nn.Module, name: str):
    """``getattr(module, name)`` for a parameter or buffer registered on ``module``, read from
    its dict: ``module.weight`` reaches nn.Module.__getattr__ only after the ordinary lookup
    has failed, 0.6-0.7 us a read on Python 3.11 (0.08 us so), where a layer's whole call at
    one token takes 10-50 us. Anything else (a property, such as torch.nn.utils.parametrize's
    parametrized weight) is read as an attribute."""
    params = module._parameters
    if name in params:
        return params[name]
    buffers = module._buffers
    return buffers[name] if name in buffers else getattr(module, name)
