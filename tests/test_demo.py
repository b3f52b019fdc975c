"""The demo's command line end to end, in a tiny configuration."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch


def test_tiny_demo_runs_and_writes_its_summary(tmp_path):
    out = tmp_path / "demo"
    cmd = [
        sys.executable, "-m", "ferrograd", "demo", "--steps", "16", "--dim", "32",
        "--layers", "1", "--heads", "2", "--seq-len", "64", "--batch-size", "4",
        "--val-batches", "2", "--sample-bytes", "24", "--lr", "1e-2", "--compare",
        "--density", "0.5", "--out", str(out),
    ]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    summary = json.loads((out / "summary.json").read_text())
    results = summary["results"]
    for name in ("ferrograd", "baseline"):
        curve = results[name]["loss_curve"]
        assert len(curve) == 16 and all(math.isfinite(x) for x in curve)
        assert sum(curve[-4:]) < sum(curve[:4])  # it learns
        assert 0 < results[name]["val_bpb"] < 9  # below log2(260) + margin
    w4 = results["w4a16"]
    assert math.isfinite(w4["val_bpb_after"]) and w4["layer_errors"]
    assert results["sample"].startswith("def ") and len(results["sample"]) > 4
    assert (out / "checkpoint.pt").exists()
    assert summary["plot"] == "loss.png" or "matplotlib" in summary["plot"]
    assert "bits per byte" in run.stderr


def test_demo_rejects_missing_data(tmp_path):
    cmd = [sys.executable, "-m", "ferrograd", "demo", "--data", str(tmp_path / "nope")]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "neither a file nor a directory" in run.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: tests/cuda runs the demo")
def test_demo_on_cuda_without_a_gpu_says_so(tmp_path):
    cmd = [sys.executable, "-m", "ferrograd", "demo", "--device", "cuda", "--out", str(tmp_path)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "torch sees no CUDA GPU" in run.stderr
