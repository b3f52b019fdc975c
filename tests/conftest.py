"""Shared fixtures: every test leaves the thread counts as it found them (ferrograd following
torch's) and starts with
subnormals kept, and ``device`` runs a test on the CPU always and on CUDA when a GPU is present
(skipped with a reason otherwise)."""

from __future__ import annotations

import os

import pytest
import torch

import ferrograd as fg

CUDA_REASON = "no CUDA GPU on this machine"


def devices() -> list:
    """The device axis: "cpu", and "cuda" marked to skip where there is no GPU."""
    cuda = pytest.param(
        "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_REASON)
    )
    return ["cpu", cuda]


@pytest.fixture(params=devices())
def device(request) -> str:
    return request.param


@pytest.fixture(autouse=True)
def _restore_thread_counts():
    theirs = torch.get_num_threads()
    yield
    torch.set_num_threads(theirs)
    fg.set_num_threads(None)  # following torch's count: the default


@pytest.fixture(autouse=True)
def _default_subnormals():
    """Every test starts with subnormals kept (MXCSR's FTZ and DAZ off): torch 2.5's compiled
    (inductor) code turns both on in the thread that runs it and leaves them on, and the
    tests of subnormal inputs would then see them flushed (docs/ops.md, "Torch and Python
    versions")."""
    torch.set_flush_denormal(False)


#: Tests of the op layer (tracing, schemas, fake kernels), not of kernel arithmetic: the passes
#: under a forced FERROGRAD_SIMD path (make test) leave them to the default pass.
_OP_LAYER = ("compile", "opcheck", "export")


def pytest_collection_modifyitems(config, items):
    if not os.environ.get("FERROGRAD_SIMD"):
        return
    kept, layer = [], []
    for item in items:
        (layer if any(word in item.name for word in _OP_LAYER) else kept).append(item)
    if layer:
        config.hook.pytest_deselected(items=layer)
        items[:] = kept
