"""The `dyncomp` command line: one module a subcommand under `dyncomp.commands`."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import warnings

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


def _quiet_dependencies(verbose: bool) -> None:
    # PEFT 0.21 calls a method that transformers 5.25 deprecated; the warning is not the user's to act on.
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)
    if not verbose:
        from transformers.utils import logging as transformers_logging

        # One "Loading weights" bar per model load hides dyncomp's own progress bars.
        transformers_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    _quiet_dependencies(args.verbose)
    try:
        return int(args.handler(args) or 0)
    except UserError as error:
        print(f"dyncomp {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dyncomp {args.command}: interrupted; finished records are kept, rerun the same command to resume", file=sys.stderr)
        return 130
