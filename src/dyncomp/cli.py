"""The `dyncomp` command line: one module a subcommand under `dyncomp.commands`."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from dyncomp.errors import UserError

# Each module defines `add_parser(subparsers)` and `run(args) -> int`.
COMMAND_MODULES = (
    "generate",
    "annotate",
    "train-compressor",
    "score",
    "verify",
    "train-classifier",
    "eval-classifier",
    "eval",
    "eval-merge",
    "pipeline",
    "bench",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dyncomp", description="Reasoning with a self-compressed key/value cache.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"dyncomp.commands.{name.replace('-', '_')}")
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.handler(args) or 0)
    except UserError as error:
        print(f"dyncomp {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dyncomp {args.command}: interrupted; finished records are kept, rerun the same command to resume", file=sys.stderr)
        return 130
