"""Test-only machinery (GPU kernel emulations, shared helpers); never part of the wheel."""
