"""The ``ferrograd`` torch.library namespace and the one way an op is declared in it.

Every op is a real dispatcher op: its CPU kernel (Rust, through ``_core``), its CUDA kernel where
ferrograd has one (kernels/*.cu), and a plain-torch reference registered for every other backend
(``CompositeExplicitAutograd``), plus a fake kernel so that torch.compile and torch.export trace
it without running it. The dispatcher picks the kernel from the tensors' device, so no op writes
``if x.is_cuda`` branches.

Ops are defined through ``torch.library.Library`` rather than the ``custom_op`` decorator: the
decorator wraps every call in Python checks that cost several microseconds, which a softmax of a
few thousand elements would feel (docs/ops.md has the measurement).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["LIB", "define", "register_autograd"]

LIB = torch.library.Library("ferrograd", "DEF")


def define(
    schema: str,
    *,
    cpu: Callable,
    reference: Callable,
    fake: Callable,
    cuda: Callable | None = None,
    tags: tuple[torch.Tag, ...] = (),
) -> torch._ops.OpOverload:
    """Declares ``ferrograd::<schema>`` with its kernels and returns the op overload."""
    name = schema.split("(", 1)[0]
    LIB.define(schema, tags=tags)
    LIB.impl(name, cpu, "CPU")
    if cuda is not None:
        LIB.impl(name, cuda, "CUDA")
    LIB.impl(name, reference, "CompositeExplicitAutograd")
    torch.library.register_fake(f"ferrograd::{name}", fake, lib=LIB)
    return getattr(torch.ops.ferrograd, name).default


def register_autograd(
    op: torch._ops.OpOverload, backward: Callable, setup_context: Callable
) -> None:
    """The backward of ``op`` (its backward must itself call ferrograd ops, so it traces)."""
    torch.library.register_autograd(op, backward, setup_context=setup_context, lib=LIB)
