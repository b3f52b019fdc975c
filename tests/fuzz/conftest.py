"""Hypothesis profiles: "ci" (make test: a few dozen derandomized examples per op, so CI is
reproducible) and "dev" (more, random); FERROGRAD_FUZZ_PROFILE picks one."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=int(os.environ.get("FERROGRAD_FUZZ_EXAMPLES", "30")),
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
    print_blob=True,
)
settings.register_profile(
    "dev", max_examples=500, deadline=None, suppress_health_check=list(HealthCheck)
)
settings.load_profile(os.environ.get("FERROGRAD_FUZZ_PROFILE", "ci"))
