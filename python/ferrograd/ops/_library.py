"""The ``ferrograd`` torch.library namespace and the one way an op is declared in it.

Every op is a real dispatcher op: its CPU kernel (Rust, through ``_core``), its CUDA kernel where
ferrograd has one (kernels/*.cu), and a plain-torch reference registered for every other backend
(``CompositeExplicitAutograd``), plus a fake kernel so that torch.compile and torch.export trace
it without running it. The dispatcher picks the kernel from the tensors' device, so no op writes
``if x.is_cuda`` branches.

Ops are defined through ``torch.library.Library`` rather than the ``custom_op`` decorator: the
decorator wraps every call in Python checks that cost several microseconds, which a softmax of a
few thousand elements would feel (docs/ops.md has the measurement). For the same reason
``call(op, *args)``, which every public function uses, runs an eager call on plain CPU tensors
straight through the op's CPU kernel and autograd formula: the same code the dispatcher would
reach, without its two Python round trips. Everything else (torch.compile, torch.export, tensor
subclasses such as FakeTensor or DTensor, dispatch modes, other devices) goes through the
dispatcher.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch

from ._compat import any_requires_grad

__all__ = ["LIB", "call", "define", "eager_cpu", "recomputed_grads", "register_autograd"]

LIB = torch.library.Library("ferrograd", "DEF")

#: Per op: its CPU kernel and, once registered, its autograd Function (for ``call``).
_CPU: dict[torch._ops.OpOverload, Callable] = {}
_AUTOGRAD: dict[torch._ops.OpOverload, type[torch.autograd.Function]] = {}
#: Per op: the same Function in the form torch.func transforms take (``register_autograd``).
_FUNC_AUTOGRAD: dict[torch._ops.OpOverload, type[torch.autograd.Function]] = {}
#: Argument types ``call`` may hand to a CPU kernel itself (plain tensors and the scalars of
#: the schemas); a tensor of any other type is traced or wrapped. A set lookup per argument:
#: the optimizer step's 17 arguments cost 2.9 us through isinstance, 0.7 us so.
_PLAIN = frozenset(
    (torch.Tensor, torch.nn.Parameter, float, int, bool, str, torch.dtype, type(None))
)


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
    op = getattr(torch.ops.ferrograd, name).default
    _CPU[op] = cpu
    return op


def _has_subclass(args: tuple | list) -> bool:
    if _PLAIN.issuperset(map(type, args)):  # the common call, in one C-level pass
        return False
    for a in args:
        if type(a) is list:  # a Tensor[] argument (spam_step_many)
            if _has_subclass(a):
                return True
        elif type(a) not in _PLAIN and isinstance(a, torch.Tensor):
            return True
    return False


# The per-call checks of `call`, looked up once (each attribute chain costs tens of ns a call).
_is_compiling = torch.compiler.is_compiling
_dispatch_modes = torch._C._len_torch_dispatch_stack
_functorch_transform = torch._C._functorch.peek_interpreter_stack  # vmap, grad, jvp, ...
_grad_enabled = torch.is_grad_enabled


def eager_cpu(args: tuple | list) -> bool:
    """Whether a call on ``args`` runs eagerly on plain CPU tensors: the first argument (a
    tensor, or a non-empty list of them) on the CPU, no tensor subclass anywhere (a wrapped
    weight, a DTensor, a FakeTensor), no torch.compile / torch.export tracing, no dispatch
    mode and no torch.func transform (whose wrapped tensors have no storage of their own).
    Such calls may skip the dispatcher; every other call must take it."""
    if _is_compiling() or _dispatch_modes():  # first: older dynamo cannot trace the rest
        return False
    if _functorch_transform() is not None:
        return False
    first = args[0][0] if type(args[0]) is list else args[0]
    return first.is_cpu and not _has_subclass(args)


def call(op: torch._ops.OpOverload, *args):
    """``op(*args)``; in eager mode on plain CPU tensors (``eager_cpu``) without the
    dispatcher's round trips. The first argument of every ferrograd op is a tensor, or a
    non-empty list of them, that decides the device; a tensor subclass anywhere takes the
    dispatcher, which unwraps it.
    """
    if not eager_cpu(args):
        if (
            not _is_compiling()
            and _functorch_transform() is not None
            and op in _FUNC_AUTOGRAD
            and _grad_enabled()
            and any_requires_grad(*args)
        ):
            # torch.func's grad takes an autograd.Function at this level only (not from inside
            # the dispatcher); its forward dispatches the op again one level down.
            return _FUNC_AUTOGRAD[op].apply(op, *args)
        return op(*args)
    if _grad_enabled() and any_requires_grad(*args):
        autograd = _AUTOGRAD.get(op)
        if autograd is None:
            return op(*args)
        return autograd.apply(_CPU[op], *args)
    return _CPU[op](*args)


def register_autograd(
    op: torch._ops.OpOverload,
    backward: Callable,
    setup_context: Callable,
    *,
    differentiable_backward: Callable | None = None,
) -> None:
    """Registers ``backward(ctx, *grads)`` (one gradient or None per input of ``op``) with
    ``setup_context(ctx, inputs, output)``, as ``torch.library.register_autograd`` takes them;
    both see ``ctx.needs_input_grad`` over the op's own inputs.

    The Autograd kernel is written here rather than taken from torch.library: torch's rebuilds
    the schema's defaults on every call that needs gradients (about 10 µs in Python). The
    backward must itself call ferrograd ops or torch ops, so that torch.compile traces it.

    A backward run with ``create_graph=True`` (a second derivative to come: Hessian-vector
    products, gradient penalties) runs ``differentiable_backward`` instead, whose result must
    carry its own graph (torch ops, or ferrograd ops with autograd); an op without one raises
    NotImplementedError there rather than hand back gradients whose own derivative is lost
    (torch's fallback for a backward op without autograd only warns and drops it).
    """
    schema = op._schema
    n_args = len(schema.arguments)
    below_autograd = torch._C._after_autograd_keyset

    def redispatch(keyset, *args):
        with torch._C._AutoDispatchBelowAutograd():
            return op.redispatch(keyset & below_autograd, *args)

    def forward(ctx, kernel, *args):
        output = kernel(*args)  # the redispatch below autograd, or the CPU kernel (call)
        _on_own_inputs(setup_context, ctx, args, output)
        return output

    def func_forward(kernel, *args):
        return kernel(*args)

    def func_setup(ctx, inputs, output):
        _on_own_inputs(setup_context, ctx, inputs[1:], output)

    def chosen_backward(ctx, *grads):
        # Grad mode is on in a backward exactly when it runs with create_graph=True.
        if not _grad_enabled() or _is_compiling() or all(g is None for g in grads):
            return backward(ctx, *grads)
        if differentiable_backward is not None:
            return differentiable_backward(ctx, *grads)
        if _functorch_transform() is not None:
            raise NotImplementedError(
                f"{schema.name}: torch.func's grad transforms run the backward with "
                "create_graph=True, and this op's backward has no derivative"
            )
        raise NotImplementedError(
            f"{schema.name}: a second derivative (backward with create_graph=True) is "
            "not supported by this op"
        )

    def backward_all(ctx, *grads):
        result = _on_own_inputs(chosen_backward, ctx, *grads)
        return (None, *result) if isinstance(result, tuple) else (None, result)

    # Built under its final name: autograd names the graph node (and profiler rows) after it.
    name = schema.name.replace("::", "_")
    Backward = type(
        name,
        (torch.autograd.Function,),
        {"forward": staticmethod(forward), "backward": staticmethod(backward_all)},
    )
    # torch.func takes only a Function with a separate setup_context, whose apply binds the
    # arguments by signature on every call (about 10 us more): the eager calls keep the first.
    _FUNC_AUTOGRAD[op] = type(
        name,
        (torch.autograd.Function,),
        {
            "forward": staticmethod(func_forward),
            "setup_context": staticmethod(func_setup),
            "backward": staticmethod(backward_all),
            "generate_vmap_rule": True,  # vmap over forward and backward alike
        },
    )

    def kernel(keyset, *args):
        if len(args) < n_args:  # the dispatcher drops trailing arguments equal to defaults
            args = tuple(args) + tuple(a.default_value for a in schema.arguments[len(args) :])
        if torch.is_grad_enabled() and any_requires_grad(*args):
            return Backward.apply(functools.partial(redispatch, keyset), *args)
        return redispatch(keyset, *args)

    LIB.impl(schema.name.split("::", 1)[1], kernel, "Autograd", with_keyset=True)
    _AUTOGRAD[op] = Backward


def _on_own_inputs(fn: Callable, ctx, *args):
    """``fn(ctx, *args)`` with ``ctx.needs_input_grad`` over the op's own inputs: the Function's
    first input is the kernel it runs, which takes no gradient."""
    needs = ctx.needs_input_grad
    ctx.needs_input_grad = needs[1:]
    try:
        return fn(ctx, *args)
    finally:
        ctx.needs_input_grad = needs


def recomputed_grads(
    forward: Callable, inputs: Sequence[torch.Tensor | None], grad: torch.Tensor
) -> list[torch.Tensor | None]:
    """The gradients of ``forward(*inputs)`` (torch ops, so differentiable) at ``grad`` towards
    each input that requires grad (None for the others), carrying a graph of their own: the
    ``differentiable_backward`` of an op whose backward kernel has no derivative."""
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    if not wanted:
        return [None] * len(inputs)
    with torch.enable_grad():
        y = forward(*inputs)
    found = iter(torch.autograd.grad(y, wanted, grad, create_graph=True, allow_unused=True))
    return [next(found) if t is not None and t.requires_grad else None for t in inputs]
