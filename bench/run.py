"""Runs ferrograd's microbenchmarks: ``python bench/run.py [names...]`` (default: all).

Each benchmark compares ferrograd with what a user would otherwise call, on the same inputs
and thread count, side by side in one process, and writes bench/results/<name>.json.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

#: name -> module in bench/ exposing ``main(threads: int | None) -> None``.
BENCHMARKS = {
    "softmax": "softmax",
    "l1norm": "l1norm",
    "packing": "packing",
    "spam": "spam",
    "shiftquant": "shiftquant",
    "cce": "cce",
    "w4a16": "w4a16",
    "overhead": "overhead",
    "model": "model",
    "demo_step": "demo",
    "fsdp": "fsdp",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"benchmarks to run: {', '.join(BENCHMARKS)}")
    parser.add_argument("--threads", type=int, default=None, help="default: torch's thread count")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; known: {list(BENCHMARKS)}")
    import torch  # (not for --help and bad names)
    from harness import with_huge_pages

    with_huge_pages()
    default_threads = torch.get_num_threads()
    for name in args.names or BENCHMARKS:
        print(f"== {name} ==", flush=True)
        importlib.import_module(BENCHMARKS[name]).main(args.threads)
        # A benchmark that sweeps thread counts (softmax: 2, then 1) leaves its last one set.
        torch.set_num_threads(default_threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
