"""Hypothesis building blocks: shapes (0-size, 0-d, occasionally large), dtypes, values with
special entries (NaN, ±inf, -0.0, denormals, ±1e38), memory layouts (transposed, offset,
strided, expanded views) and invalid replacements for arguments.

Values come from a drawn seed through torch's generator rather than element by element, so a
case stays cheap to generate and to reproduce from its description.
"""

from __future__ import annotations

import math

import hypothesis.strategies as st
import numpy as np
import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
#: The dtypes of the Rust kernels (float64 runs the torch reference path).
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)
NAN, INF = math.nan, math.inf
SPECIALS = (NAN, INF, -INF, -0.0, 0.0, 1e-40, -1e-45, 1e38, -1e38, 3e-39, 65504.0, 1e-8)
#: Invalid values for an int option (each a TypeError or a ValueError).
BAD_INTS = (-1, 0, 2**64, -(2**70), 1.5, 2.0, "3", None, True, float("nan"))
#: Invalid values for a float option that must be finite.
BAD_FLOATS = (NAN, INF, -INF, "1e-3", None, True, [1.0])
#: Not tensors.
NOT_TENSORS = (None, 3.0, [1.0, 2.0], "x", np.ones((2, 2), dtype=np.float32))
#: Large sides, drawn now and then (long rows: SIMD tails, blocking, 2^16 boundaries).
LARGE_SIDES = (63, 64, 65, 127, 129, 255, 257, 1000, 1023, 4097, 65535, 65537)


def rare(draw, one_in: int) -> bool:
    """True about once in ``one_in`` draws."""
    return draw(st.integers(0, one_in - 1)) == 0


@st.composite
def shapes(draw, min_dims=0, max_dims=3, max_side=9, max_numel=1 << 17, min_side=0):
    """Small shapes with 0-size sides; now and then one side from LARGE_SIDES."""
    ndim = draw(st.integers(min_dims, max_dims))
    sides = [draw(st.integers(min_side, max_side)) for _ in range(ndim)]
    if ndim and rare(draw, 8):
        sides[draw(st.integers(0, ndim - 1))] = draw(st.sampled_from(LARGE_SIDES))
    while math.prod(sides) > max_numel:
        sides[sides.index(max(sides))] //= 2
    return tuple(sides)


@st.composite
def values(draw, shape, dtype=torch.float32, specials=True, scales=(1.0, 1e-3, 1e3, 1e-30)):
    """A contiguous tensor of ``shape``: Gaussian, uniform, constant or small integers times a
    drawn scale, with (``specials``) a few special entries at drawn positions."""
    seed = draw(st.integers(0, 2**31 - 1))
    kind = draw(st.sampled_from(("normal", "normal", "uniform", "constant", "integers")))
    scale = draw(st.sampled_from(scales))
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        x = torch.randn(shape, generator=g, dtype=torch.float64)
    elif kind == "uniform":
        x = torch.rand(shape, generator=g, dtype=torch.float64) * 2 + 9
    elif kind == "constant":
        x = torch.full(shape, float(torch.randn((), generator=g)), dtype=torch.float64)
    else:
        x = torch.randint(-4, 5, shape, generator=g).double()
    x = x * scale
    numel = x.numel()
    if specials and numel:
        flat = x.view(-1)
        for _ in range(draw(st.integers(0, 3)) if rare(draw, 3) else 0):
            flat[draw(st.integers(0, numel - 1))] = draw(st.sampled_from(SPECIALS))
    return x.to(dtype)


@st.composite
def layouts(draw, x: torch.Tensor, allow_expand=True):
    """``x`` as a view of another memory layout: contiguous, transposed (last two dims),
    offset into a larger storage, every other element of a wider buffer, or expanded along a
    dim (its values then repeat the first slice). torch has no negative strides, so a flipped
    tensor is always a copy: ``flip`` gives that copy. Returns (tensor, name)."""
    kinds = ["contiguous", "offset", "flip"]
    if x.dim() >= 1:
        kinds.append("strided")
    if x.dim() >= 2:
        kinds.append("transposed")
    if allow_expand and any(s > 1 for s in x.shape):
        kinds.append("expanded")
    kind = draw(st.sampled_from(kinds))
    if kind == "contiguous":
        return x, kind
    if kind == "flip":
        return (x.flip(-1) if x.dim() else x.clone()), kind
    if kind == "offset":
        buf = torch.empty(x.numel() + 3, dtype=x.dtype)
        buf[3:] = x.reshape(-1)
        buf[:3] = 7.0 if x.is_floating_point() else 7
        return buf[3:].view(x.shape), kind
    if kind == "strided":
        buf = torch.full((*x.shape[:-1], 2 * x.shape[-1]), 5, dtype=x.dtype)
        view = buf[..., ::2]
        view.copy_(x)
        return view, kind
    if kind == "transposed":
        return x.transpose(-1, -2).contiguous().transpose(-1, -2), kind
    dims = [d for d, s in enumerate(x.shape) if s > 1]
    d = draw(st.sampled_from(dims))
    return x.narrow(d, 0, 1).expand(x.shape), kind


def describe(x: object) -> str:
    """A short description of an argument for the campaign's reports."""
    if isinstance(x, torch.Tensor):
        return (
            f"tensor({tuple(x.shape)}, {x.dtype}, stride={x.stride()}, "
            f"offset={x.storage_offset()}, device={x.device.type})"
        )
    text = repr(x)
    return text if len(text) < 80 else text[:77] + "..."


@st.composite
def invalid_choice(draw, options: list, one_in: int = 3):
    """None (a valid case) about (one_in - 1) / one_in of the time, else one of ``options``."""
    if not options or not rare(draw, one_in):
        return None
    return draw(st.sampled_from(options))
