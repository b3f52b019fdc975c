"""Which dtype torch's CPU matmul is fastest in on this machine, for ops that hand it 16-bit
inputs (cut cross-entropy's chunk matmuls, W4A16's backward).

A native bfloat16 instruction set does not make torch's bfloat16 matmul the faster one: on an
AMD Zen 4 VM (AVX512-BF16, oneDNN's brgemm) it runs at about 3-4x the float32 rate, on an Intel
Xeon VM of family 6 model 207 with AVX512-BF16 but no AMX exposed at 0.55x (1024^3: 13.5 ms
against MKL's float32 7.5 ms), and on AVX2-only CPUs torch emulates it (8x slower). So the
choice is measured, once per process, on a matmul of the shape those ops issue.
"""

from __future__ import annotations

import functools
import time

import torch

#: The probe: rows x inner x columns of a logits chunk (a block of tokens against a piece of
#: the vocabulary); about 0.3 GFLOP, so each timed call is a millisecond or two.
_PROBE_SHAPE = (256, 512, 1024)
#: bfloat16 is chosen only when clearly faster: the two dtypes round differently, and a choice
#: that flipped between runs of the same program on timing noise would change its losses.
_MARGIN = 1.2


def _best_of_each(fns, repeats: int = 5) -> list[float]:
    """The fastest of ``repeats`` calls of each of ``fns``, called in turn round by round: a
    burst of load from another process then slows some calls of each, not every call of one
    (one after the other, 5 of 28 processes picked bfloat16 on the Xeon beside a process
    running float32 matmuls on both cores; in turn, 0 of 32)."""
    for fn in fns:
        fn()  # warm-up: oneDNN creates its primitive on the first call
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


@torch.compiler.assume_constant_result
def bf16_matmul_is_faster() -> bool:
    """Whether torch's bfloat16 CPU matmul is clearly faster than its float32 one here: the
    best of five calls of each, in turn, on one chunk-shaped product (about 20 ms once per
    process). A constant to torch.compile, which calls it while tracing: traced into, its clock
    reads and backend probe broke the graph (11 breaks in a patched 2-layer Llama's loss under
    bf16 autocast; the mark is not seen through functools.cache, hence the two functions)."""
    return _measured()


@functools.cache
def _measured() -> bool:
    if not (torch.backends.mkldnn.is_available() and _mkldnn_bf16()):
        return False  # emulated: never faster
    m, k, n = _PROBE_SHAPE
    with torch.autocast("cpu", enabled=False), torch.no_grad():
        # (device and dtype spelled out: a default device or dtype the user set must not move it)
        like = {"device": "cpu", "dtype": torch.float32}
        a, b = torch.randn(m, k, **like), torch.randn(k, n, **like)
        a16, b16 = a.bfloat16(), b.bfloat16()
        out, out16 = torch.empty(m, n, **like), torch.empty(m, n, device="cpu", dtype=a16.dtype)
        f32, bf16 = _best_of_each(
            [lambda: torch.mm(a, b, out=out), lambda: torch.mm(a16, b16, out=out16)]
        )
    return bf16 * _MARGIN < f32


def _mkldnn_bf16() -> bool:
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(probe is not None and probe())
