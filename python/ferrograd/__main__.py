"""Command line: ``python -m ferrograd demo [options]`` (see ``ferrograd.demo``)."""

from __future__ import annotations

import argparse

from . import demo


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ferrograd")
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser(
        "demo",
        help=demo.__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    demo.add_arguments(demo_parser)
    args = parser.parse_args(argv)
    if args.command == "demo":
        demo.run(demo.config_from(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
