"""`dyncomp pipeline`: train-compressor, train-classifier and eval from one YAML file."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("pipeline", help="run train-compressor, train-classifier and eval from a YAML config")
    parser.add_argument("--config", required=True, help="YAML file, e.g. configs/smollm2-gsm8k-smoke.yaml")
    parser.add_argument("--device", default=None, help="torch device for every stage (default: cuda when available)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from dyncomp.evaluation.report import format_table
    from dyncomp.pipeline import run_pipeline

    results = run_pipeline(args.config, device=args.device)
    print(format_table(results))
    return 0
