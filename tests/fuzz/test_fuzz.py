"""Every public op under fuzzed inputs (ops.py): valid inputs match the reference, invalid ones
raise a ValueError / TypeError naming the op and the argument, inputs come back unchanged bit
for bit. make test runs the "ci" hypothesis profile (conftest.py); make fuzz runs campaign.py."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuzz.harness import evaluate
from fuzz.ops import CASES


@pytest.mark.parametrize("name", sorted(CASES))
def test_fuzz(name: str) -> None:
    @given(st.data())
    def run(data) -> None:
        case = data.draw(CASES[name], label="case")
        kind, detail = evaluate(case)
        assert kind == "pass", f"{name}: {kind}: {detail}\ncase: {case.desc}"

    run()
