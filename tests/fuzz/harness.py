"""One fuzz case and how it is judged: the call, the inputs that must come back unchanged bit for
bit, whether the input is invalid (then a ValueError / TypeError naming the op and the argument
is the only right answer) and the reference check of a valid call's result."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import torch

#: Outcome kinds, in the order of the campaign's table.
KINDS = ("pass", "wrong", "accepted_invalid", "unclear_error", "mutated", "crash")


@dataclasses.dataclass(repr=False)
class Case:
    """``call()`` runs the op; ``check(result)`` raises AssertionError on a wrong answer.

    ``invalid``: None for a valid input, else the names of the offending argument (one of them
    must appear in the message). ``prefixes``: how the message may start (the op's names).
    ``errors``: the exception types that count as clear.
    """

    call: Callable[[], object]
    inputs: list
    prefixes: tuple[str, ...]
    check: Callable[[object], None] | None = None
    invalid: tuple[str, ...] | None = None
    errors: tuple[type[BaseException], ...] = (ValueError, TypeError)
    desc: dict = dataclasses.field(default_factory=dict)

    def __repr__(self) -> str:
        return f"Case({self.desc})"


def tensors_in(obj: object, seen: set | None = None) -> list[torch.Tensor]:
    """Every tensor reachable through containers, dataclasses and modules."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, torch.nn.Module):
        return [t for t in obj.state_dict(keep_vars=True).values() if isinstance(t, torch.Tensor)]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in tensors_in(v, seen)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in tensors_in(v, seen)]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = [getattr(obj, f.name) for f in dataclasses.fields(obj)]
        return [t for v in fields for t in tensors_in(v, seen)]
    return []


def _storage_bytes(t: torch.Tensor) -> torch.Tensor | None:
    if t.device.type == "meta" or t.is_sparse:
        return None
    storage = t.untyped_storage()
    return torch.empty(0, dtype=torch.uint8, device=t.device).set_(storage).clone()


def snapshot(inputs: list) -> list:
    """Everything about the inputs' tensors a call must not change: storage bytes (the whole
    storage, so a write past a view shows), shape, strides, offset, dtype, version counter."""
    return [
        (t, _storage_bytes(t), t.shape, t.stride(), t.storage_offset(), t.dtype, t._version)
        for t in tensors_in(inputs)
    ]


def changed(before: list) -> str | None:
    for t, data, shape, stride, offset, dtype, version in before:
        meta = (t.shape, t.stride(), t.storage_offset(), t.dtype)
        if meta != (shape, stride, offset, dtype):
            return f"tensor metadata changed: {(shape, stride, offset, dtype)} -> {meta}"
        if t._version != version:
            return f"a {tuple(shape)} {dtype} input was written in place"
        if data is not None and not torch.equal(data, _storage_bytes(t)):
            return f"a {tuple(shape)} {dtype} input's storage bytes changed"
    return None


def names_arg(message: str, names: tuple[str, ...]) -> bool:
    return any(re.search(rf"(?<![\w.]){re.escape(n)}(?!\w)", message) for n in names)


def is_clear(err: BaseException, case: Case) -> bool:
    """A clear error: one of the case's types, the message starting with an op name and (for an
    invalid input) naming the argument."""
    if not isinstance(err, case.errors):
        return False
    message = str(err)
    if not message.startswith(case.prefixes):
        return False
    return case.invalid is None or names_arg(message, case.invalid)


def evaluate(case: Case) -> tuple[str, str]:
    """(kind, detail): the case's outcome, kind one of KINDS (but "crash", which only a process
    that died can report)."""
    before = snapshot(case.inputs)
    try:
        result = case.call()
    except (AssertionError, KeyboardInterrupt):
        raise
    except Exception as err:  # noqa: BLE001 - every exception is judged
        mutated = changed(before)
        if mutated:
            return "mutated", f"on the error path ({type(err).__name__}): {mutated}"
        text = f"{type(err).__name__}: {err}"[:400]
        if not is_clear(err, case):
            return "unclear_error", text
        if case.invalid is None:
            return "wrong", f"a valid input was refused: {text}"
        return "pass", ""
    mutated = changed(before)
    if mutated:
        return "mutated", mutated
    if case.invalid is not None:
        return "accepted_invalid", f"invalid {'/'.join(case.invalid)} accepted"
    try:
        if case.check is not None:
            case.check(result)
    except AssertionError as err:
        return "wrong", str(err)[:600]
    except Exception as err:  # noqa: BLE001 - a result the check cannot read is wrong too
        return "wrong", f"the result could not be checked: {type(err).__name__}: {err}"[:600]
    return "pass", ""
