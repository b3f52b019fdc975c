"""Argument checks shared by the ops: every message names the op and the argument."""

from __future__ import annotations

import math
import numbers
import operator

import torch

from .._errors import DimensionError

#: Floating dtypes the Rust CPU kernels take (computed in float32).
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the ops compute and keep statistics in for inputs of ``dtype``: float64 for
    float64, float32 for every other floating dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_dtype(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``t.to(dtype)``, but ``t`` itself (or None) where it is already in ``dtype``:
    ``Tensor.to`` costs about 1 us a call even where it has nothing to do."""
    return t if t is None or t.dtype == dtype else t.to(dtype)


def check_tensor(op: str, name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def check_floating(op: str, name: str, x: torch.Tensor) -> None:
    if not x.is_floating_point():
        raise TypeError(
            f"{op}: {name} must be a floating-point tensor (float32, bfloat16, float16 or "
            f"float64), got {x.dtype}"
        )


def normalize_dim(op: str, dim: object, ndim: int) -> int:
    """Returns dim in [0, max(ndim, 1)); a 0-d tensor accepts dim 0 and -1, as in torch, and
    any integer type (numpy's too) as torch does."""
    if isinstance(dim, bool):
        raise TypeError(f"{op}: dim must be an int, got bool")
    try:
        dim = operator.index(dim)
    except TypeError:
        raise TypeError(f"{op}: dim must be an int, got {type(dim).__name__}") from None
    rank = max(ndim, 1)
    if not -rank <= dim < rank:
        raise DimensionError(
            f"{op}: dim {dim} is out of range for a tensor with {ndim} dimension(s) "
            f"(expected in [{-rank}, {rank - 1}])"
        )
    return dim % rank


def check_bool(op: str, name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be a bool, got {type(value).__name__}")
    return value


def as_int(op: str, name: str, value: object) -> int:
    """An integer (Python's or numpy's, as torch's modules take them; not a bool) as an int."""
    if type(value) is int:  # the common case, without the ABC check's ~0.3 us
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__}")
    return int(value)


def check_int(op: str, name: str, value: object, low: int, high: int | None = None) -> int:
    """An integer (``as_int``) at least ``low``, and at most ``high`` when given, as an int."""
    value = as_int(op, name, value)
    if high is None and value < low:
        raise ValueError(f"{op}: {name} must be at least {low}, got {value}")
    if high is not None and not low <= value <= high:
        raise ValueError(f"{op}: {name} must be in [{low}, {high}], got {value}")
    return value


def check_number(op: str, name: str, value: object, low: float, high: float = math.inf) -> float:
    """A real number (int or float, numpy's too; not a bool) in [low, high], as a float."""
    if type(value) is not float and (
        isinstance(value, bool) or not isinstance(value, numbers.Real)
    ):
        raise TypeError(f"{op}: {name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not low <= value <= high:
        raise ValueError(f"{op}: {name} must be in [{low}, {high}], got {value}")
    return value
