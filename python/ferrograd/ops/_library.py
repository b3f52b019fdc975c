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
    """Registers ``backward(ctx, *grads)`` (one gradient or None per input of ``op``) with
    ``setup_context(ctx, inputs, output)``, as ``torch.library.register_autograd`` takes them.

    The Autograd kernel is written here rather than taken from torch.library: torch's rebuilds
    the schema's defaults on every call that needs gradients (about 10 µs in Python). The
    backward must itself call ferrograd ops or torch ops, so that torch.compile traces it.
    """
    schema = op._schema
    n_args = len(schema.arguments)
    below_autograd = torch._C._after_autograd_keyset

    class Backward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, keyset, *args):
            with torch._C._AutoDispatchBelowAutograd():
                output = op.redispatch(keyset & below_autograd, *args)
            setup_context(ctx, args, output)
            return output

        @staticmethod
        def backward(ctx, *grads):
            needs = ctx.needs_input_grad
            ctx.needs_input_grad = needs[1:]  # as the op's own inputs see it
            try:
                result = backward(ctx, *grads)
            finally:
                ctx.needs_input_grad = needs
            return (None, *result) if isinstance(result, tuple) else (None, result)

    Backward.__name__ = f"{schema.name.replace('::', '_')}_backward"

    def kernel(keyset, *args):
        if len(args) < n_args:  # the dispatcher drops trailing arguments equal to defaults
            args = tuple(args) + tuple(a.default_value for a in schema.arguments[len(args) :])
        if torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
            return Backward.apply(keyset, *args)
        with torch._C._AutoDispatchBelowAutograd():
            return op.redispatch(keyset & below_autograd, *args)

    LIB.impl(schema.name.split("::", 1)[1], kernel, "Autograd", with_keyset=True)
