"""The demo on a GPU (every primitive's CUDA path), in a tiny configuration."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from ferrograd import cuda as fgcuda

pytestmark = pytest.mark.skipif(not fgcuda.is_available(), reason="needs a CUDA GPU")


def test_tiny_demo_runs_on_cuda(tmp_path):
    out = tmp_path / "demo"
    cmd = [
        sys.executable, "-m", "ferrograd", "demo", "--device", "cuda", "--steps", "16",
        "--dim", "64", "--layers", "1", "--heads", "2", "--seq-len", "64", "--batch-size", "4",
        "--val-batches", "2", "--sample-bytes", "24", "--lr", "1e-2", "--compare",
        "--out", str(out),
    ]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, encoding="utf-8", timeout=600)
    assert run.returncode == 0, run.stderr
    results = json.loads((out / "summary.json").read_text(encoding="utf-8"))["results"]
    for name in ("ferrograd", "baseline"):
        curve = results[name]["loss_curve"]
        assert len(curve) == 16 and all(math.isfinite(x) for x in curve)
        assert sum(curve[-4:]) < sum(curve[:4])
    assert math.isfinite(results["w4a16"]["val_bpb_after"])
