"""FSDP2 training of the demo model on 2 gloo processes: ShiftQuantLinear weights all-gathered
as ShiftQuant codes (``fg.nn.compress_all_gather``) against the same run all-gathering float32.

Each configuration trains ``python -m ferrograd demo``'s byte model (8-bit ShiftQuantLinear,
L1LayerNorm, cut cross-entropy, SPAM, bf16 autocast where the CPU has BF16) for ``--steps``
steps on the same batches, sharded with ``fully_shard`` per block and on the model, once with
float all-gathers and once compressed. Reported per configuration: the bytes each rank hands to
``all_gather_single`` per step (``fg.nn.fsdp.all_gather_bytes``), their ratio, the loss per
step, and the training loss at the end (mean of the last 20 steps; both runs see the same
batches) with its relative difference. Sizes: the demo's default model, and a wider one whose
ShiftQuantLinear weights hold nearly all the parameters (embeddings and norms stay float32
either way).

``python bench/fsdp.py [--steps N] [--threads T]`` starts ``torch.distributed.run`` itself and
writes bench/results/fsdp.json under this CPU's name.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

#: (name, demo model sizes) of each configuration.
MODELS = {
    "demo default (dim 128, 2 blocks)": {},
    "wider (dim 256, 4 blocks)": {"dim": 256, "layers": 4},
}
WORLD = 2
TAIL = 20  # steps averaged for the end-of-training loss


def _rank_main(steps: int, out: Path) -> None:
    """One rank: every model, float and compressed all-gathers, through the demo's train()."""
    import torch

    from ferrograd import demo
    from ferrograd.nn.fsdp import all_gather_bytes

    threads = int(os.environ["OMP_NUM_THREADS"])
    torch.set_num_threads(threads)

    base = demo.Config(data=[demo.default_data()], steps=steps, fsdp=True)
    group = demo.Group(base)
    train_files, _ = demo.split_files(base.data)
    runs = {}
    for name, sizes in MODELS.items():
        for compressed in (False, True):
            cfg = replace(base, compress_all_gather=compressed, **sizes)
            start = time.perf_counter()
            with all_gather_bytes() as sent:
                _, _, stats = demo.train(cfg, train_files, True, group, quiet=True)
            runs[f"{name} | {'codes' if compressed else 'float32'}"] = {
                "all_gather_bytes_per_step": sent.bytes / steps,
                "seconds": time.perf_counter() - start,
                "loss_curve": stats["loss_curve"],
            }
    if group.main:
        out.write_text(json.dumps(runs))
    group.barrier()
    group.close()


def _rows(runs: dict) -> list[dict]:
    rows = []
    for name in MODELS:
        plain, codes = runs[f"{name} | float32"], runs[f"{name} | codes"]
        tails = [r["loss_curve"][-TAIL:] for r in (plain, codes)]
        end = [sum(t) / len(t) for t in tails]
        rows.append({
            "model": name,
            "float32_MB_per_step": plain["all_gather_bytes_per_step"] / 1e6,
            "codes_MB_per_step": codes["all_gather_bytes_per_step"] / 1e6,
            "bytes_ratio": codes["all_gather_bytes_per_step"] / plain["all_gather_bytes_per_step"],
            "first_loss_float32": plain["loss_curve"][0],
            "first_loss_codes": codes["loss_curve"][0],
            "end_loss_float32": end[0],
            "end_loss_codes": end[1],
            "end_loss_rel_diff": end[1] / end[0] - 1,
            "seconds_float32": plain["seconds"],
            "seconds_codes": codes["seconds"],
            "loss_curve_float32": plain["loss_curve"],
            "loss_curve_codes": codes["loss_curve"],
        })  # fmt: skip
    return rows


def main(threads: int | None = None, steps: int = 200) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from harness import machine, save_run

    threads = threads or 1
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "runs.json"
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc_per_node", str(WORLD), __file__, "--rank-main", str(out),
            "--steps", str(steps),
        ]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        subprocess.run(cmd, check=True, env=env)
        runs = json.loads(out.read_text())
    rows = _rows(runs)
    for r in rows:
        print(
            f"{r['model']}: all-gather {r['float32_MB_per_step']:.3f} -> "
            f"{r['codes_MB_per_step']:.3f} MB/step per rank ({r['bytes_ratio']:.3f}x); loss "
            f"step 1 {r['first_loss_float32']:.5f} / {r['first_loss_codes']:.5f}, last {TAIL} "
            f"steps {r['end_loss_float32']:.4f} / {r['end_loss_codes']:.4f} "
            f"({100 * r['end_loss_rel_diff']:+.2f}%)"
        )
    save_run("fsdp", {
        "machine": machine(threads),
        "notes": {
            "setup": f"{WORLD} gloo processes x {threads} threads, FSDP2 fully_shard per block "
                     "and on the model, the demo's data, optimizer (SPAM) and schedule",
            "bytes": "bytes each rank passes to all_gather_single per step (all_gather_bytes)",
            "end_loss": f"mean training loss (nats per byte) of the last {TAIL} steps",
            "steps": steps,
        },
        "rows": rows,
    })  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=None, help="threads per process (1)")
    parser.add_argument("--rank-main", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_main is not None:
        _rank_main(args.steps, args.rank_main)
    else:
        main(args.threads, args.steps)
