"""ferrograd: Rust-accelerated low-level training primitives for PyTorch."""

from __future__ import annotations

import numbers

import torch

from . import _core, data, nn, optim, quant
from ._errors import DimensionError
from .ops.cce import linear_cross_entropy
from .ops.shiftquant import ShiftQuantTensor, shiftquant, shiftquant_matmul
from .ops.softmax import log_softmax, softmax
from .ops.w4a16 import w4a16_matmul

__version__: str = _core.__version__

__all__ = [
    "DimensionError",
    "ShiftQuantTensor",
    "__version__",
    "cpu_info",
    "data",
    "get_num_threads",
    "linear_cross_entropy",
    "log_softmax",
    "nn",
    "optim",
    "quant",
    "set_num_threads",
    "shiftquant",
    "shiftquant_matmul",
    "simd_level",
    "softmax",
    "w4a16_matmul",
]


#: The most threads set_num_threads accepts (rust/threads.rs holds the same bound).
_MAX_THREADS = 1024


def set_num_threads(n: int | None) -> None:
    """Sets how many threads ferrograd's CPU kernels use. By default they use
    ``torch.get_num_threads()``, read at each call, so ``torch.set_num_threads`` (and a
    DataLoader worker's single thread) applies to them too; an int pins ferrograd's own count,
    which torch's then no longer changes; ``None`` follows torch's again."""
    if n is None:
        _core.set_num_threads(max(1, torch.get_num_threads()), pin=False)
        return
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(f"set_num_threads: n must be an int or None, got {type(n).__name__}")
    if not 1 <= n <= _MAX_THREADS:  # each thread starts at once: 10**6 is a mistake
        raise ValueError(f"set_num_threads: n must be in [1, {_MAX_THREADS}], got {n}")
    _core.set_num_threads(int(n))


def get_num_threads() -> int:
    """The number of threads ferrograd's CPU kernels use."""
    return _core.get_num_threads()


def simd_level() -> str:
    """The SIMD path in use: ``FERROGRAD_SIMD`` if set (read once), else the widest detected."""
    return _core.simd_level()


def cpu_info() -> dict:
    """Detected CPU features (less those ``FERROGRAD_DISABLE_FEATURES`` turned off, which
    ``"disabled"`` lists) and the SIMD paths this CPU supports."""
    return _core.cpu_info()


# torch.load's default (weights_only=True) rebuilds only the types it is told are safe: these
# hold tensors and plain values (a W4Weight is rebuilt through its checking constructor).
torch.serialization.add_safe_globals([ShiftQuantTensor, quant.W4Weight, data.PackedBatch])

set_num_threads(None)  # follow torch (its count now stands in where no OpenMP runtime holds it)
