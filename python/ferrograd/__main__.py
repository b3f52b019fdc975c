"""Command line: ``python -m ferrograd demo [options]`` (see ``ferrograd.demo``) and
``python -m ferrograd bench-model [options]`` (bench/model.py of a source checkout)."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from . import demo

#: bench/ is not in the wheel: found from an editable install's python/ferrograd/ only.
BENCH_MODEL = Path(__file__).resolve().parents[2] / "bench" / "model.py"


def bench_model(argv: list[str]) -> None:
    if not BENCH_MODEL.is_file():
        raise SystemExit(
            "python -m ferrograd bench-model runs bench/model.py of a ferrograd source checkout "
            f"(not in the wheel; looked for {BENCH_MODEL}): install the checkout in editable "
            "mode (make develop) or run `python bench/model.py` there"
        )
    spec = importlib.util.spec_from_file_location("ferrograd_bench_model", BENCH_MODEL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    module.main(argv=argv)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ferrograd")
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser(
        "demo",
        help=demo.__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    demo.add_arguments(demo_parser)
    # Its options (and --help) are bench/model.py's own.
    commands.add_parser(
        "bench-model",
        help="training-step benchmark of a transformers model (bench/model.py; --help there)",
        add_help=False,
    )
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench-model":
        bench_model(rest)
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    else:
        demo.run(demo.config_from(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
