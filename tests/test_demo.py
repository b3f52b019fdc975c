"""The demo's command line end to end, in a tiny configuration."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from support.distributed import fsdp2_on_cpu


def test_tiny_demo_runs_and_writes_its_summary(tmp_path):
    out = tmp_path / "demo"
    cmd = [
        sys.executable, "-m", "ferrograd", "demo", "--steps", "16", "--dim", "32",
        "--layers", "1", "--heads", "2", "--seq-len", "64", "--batch-size", "4",
        "--val-batches", "2", "--sample-bytes", "24", "--lr", "1e-2", "--compare",
        "--density", "0.5", "--out", str(out),
    ]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, encoding="utf-8", timeout=600)
    assert run.returncode == 0, run.stderr
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    results = summary["results"]
    for name in ("ferrograd", "baseline"):
        curve = results[name]["loss_curve"]
        assert len(curve) == 16 and all(math.isfinite(x) for x in curve)
        assert sum(curve[-4:]) < sum(curve[:4])  # it learns
        assert 0 < results[name]["val_bpb"] < 9  # below log2(260) + margin
        assert results[name]["peak_memory_MiB"] > 0 and results[name]["bytes_per_second"] > 0
    # bf16 autocast only where the CPU multiplies bf16 natively (and, measured in the demo's
    # own process, faster than float32): then the ferrograd run uses it too.
    labels = {"torch float32 + AdamW fused"}
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        labels.add("torch bf16 autocast + AdamW fused")
    label = results["baseline"]["label"]
    assert label in labels
    precision = "bf16 autocast" if "bf16" in label else "float32"
    assert results["ferrograd"]["label"].endswith(f"({precision})")
    assert "bytes/s" in run.stderr and "peak memory" in run.stderr  # the side-by-side table
    # nothing of this machine's file system in the summary
    text = (out / "summary.json").read_text(encoding="utf-8")
    assert str(tmp_path) not in text and sys.prefix not in text
    assert summary["config"]["data"] == ["python-stdlib"]
    w4 = results["w4a16"]
    assert math.isfinite(w4["val_bpb_after"]) and w4["layer_errors"]
    assert results["sample"].startswith("def ") and len(results["sample"]) > 4
    assert (out / "checkpoint.pt").exists()
    assert summary["plot"] == "loss.png" or "matplotlib" in summary["plot"]
    assert "bits per byte" in run.stderr


def test_torchrun_two_processes_reproduce_one_process_at_the_same_global_batch(tmp_path):
    """Two gloo ranks, each training half the rows of every batch, give the one-process loss
    curve: the first step to rounding (the same forward), the float baseline to float-sum order
    throughout; ShiftQuant's stochastic gradient rounding keys its noise on each rank's own
    row block, so the ferrograd curve drifts slightly after the first update."""
    tiny = [
        "--steps", "5", "--dim", "32", "--layers", "1", "--heads", "2", "--seq-len", "64",
        "--batch-size", "4", "--val-batches", "2", "--sample-bytes", "8", "--lr", "1e-2",
        "--compare",
    ]  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]
    for cmd in (
        [sys.executable, "-m", "ferrograd", "demo", *tiny, "--out", str(one)],
        [*launch, "2", "-m", "ferrograd", "demo", *tiny, "--out", str(two)],
    ):
        run = subprocess.run(cmd, capture_output=True, encoding="utf-8", timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
    a = json.loads((one / "summary.json").read_text(encoding="utf-8"))
    b = json.loads((two / "summary.json").read_text(encoding="utf-8"))
    assert b["machine"]["processes"] == 2 and a["machine"]["processes"] == 1
    for name, tol in (("baseline", 2e-4), ("ferrograd", 2e-2)):
        ca, cb = a["results"][name]["loss_curve"], b["results"][name]["loss_curve"]
        # The same forward, summed in another order: MKL's thread count differs between one
        # process and two (and drops under load): 7e-6 seen on torch 2.5.1 beside pip installs.
        assert ca[0] == pytest.approx(cb[0], rel=2e-5)
        assert cb == pytest.approx(ca, rel=tol)


@fsdp2_on_cpu
def test_fsdp_sharded_runs_train_as_the_replicated_one_and_codes_on_the_wire_change_no_forward(
    tmp_path,
):
    """--fsdp (FSDP2, fully_shard per block) on two gloo ranks trains as the replicated
    two-rank run (same rows per rank, gradients summed either way); --compress-all-gather's
    first step sees the same weights as the float all-gather (the forward re-makes the codes
    it was sent), and training stays close."""
    tiny = [
        "--steps", "4", "--dim", "32", "--layers", "2", "--heads", "2", "--seq-len", "64",
        "--batch-size", "4", "--val-batches", "2", "--sample-bytes", "8", "--lr", "1e-2",
    ]  # fmt: skip
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]
    curves = {}
    for name, extra in (("replicated", []), ("fsdp", ["--fsdp"]),
                        ("codes", ["--fsdp", "--compress-all-gather"])):  # fmt: skip
        out = tmp_path / name
        cmd = [*launch, "2", "-m", "ferrograd", "demo", *tiny, *extra, "--out", str(out)]
        run = subprocess.run(cmd, capture_output=True, encoding="utf-8", timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
        assert summary["config"]["fsdp"] == (name != "replicated")
        curves[name] = summary["results"]["ferrograd"]["loss_curve"]
        assert (out / "checkpoint.pt").exists()  # the gathered model, saved by rank 0
    assert curves["fsdp"] == pytest.approx(curves["replicated"], rel=1e-4)
    assert curves["codes"][0] == pytest.approx(curves["fsdp"][0], rel=1e-6)
    assert curves["codes"] == pytest.approx(curves["fsdp"], rel=2e-2)


def test_demo_sharding_options_need_torchrun_and_each_other(tmp_path):
    base = [sys.executable, "-m", "ferrograd", "demo", "--out", str(tmp_path)]
    for extra, message in (
        (["--compress-all-gather"], "--compress-all-gather needs --fsdp"),
        (["--fsdp"], "--fsdp shards the model over the processes torchrun starts"),
    ):
        run = subprocess.run([*base, *extra], capture_output=True, encoding="utf-8", timeout=120)
        assert run.returncode != 0 and message in run.stderr, run.stderr[-2000:]


def test_demo_rejects_missing_data(tmp_path):
    cmd = [sys.executable, "-m", "ferrograd", "demo", "--data", str(tmp_path / "nope")]
    run = subprocess.run(cmd, capture_output=True, encoding="utf-8", timeout=120)
    assert run.returncode != 0 and "neither a file nor a directory" in run.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: tests/cuda runs the demo")
def test_demo_on_cuda_without_a_gpu_says_so(tmp_path):
    cmd = [sys.executable, "-m", "ferrograd", "demo", "--device", "cuda", "--out", str(tmp_path)]
    run = subprocess.run(cmd, capture_output=True, encoding="utf-8", timeout=120)
    assert run.returncode != 0 and "torch sees no CUDA GPU" in run.stderr
