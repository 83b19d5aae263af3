"""`dyncomp bench`: side-by-side speed and memory ratios on the packaged model."""

from __future__ import annotations

import argparse

from dyncomp.bench.runner import BenchConfig

DEFAULTS = BenchConfig()


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="measure speed and memory ratios side by side and write them as JSON")
    parser.add_argument("--quick", action="store_true", help="shorter runs, one pair each (about 5 minutes on 2 CPU cores)")
    parser.add_argument("--out", default=DEFAULTS.out, help="JSON file for the results; a .md table is written beside it")
    parser.add_argument("--model", default=DEFAULTS.model, help="model to benchmark")
    parser.add_argument("--compressor", default=DEFAULTS.compressor, help="trained compressor folder")
    parser.add_argument("--classifier", default=DEFAULTS.classifier, help="trained classifier folder")
    parser.add_argument("--data", default=DEFAULTS.data, help="GSM8K file whose questions serve as prompts")
    parser.add_argument("--device", default=DEFAULTS.device, help="torch device (default: cuda when available)")
    parser.add_argument("--repeats", type=int, default=DEFAULTS.repeats, help="A/B pairs per comparison (default 3; with --quick, 1 except 3 for none_vs_hf_generate)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from dyncomp.bench.runner import format_table, run_bench

    fields = {name: getattr(args, name) for name in BenchConfig.__dataclass_fields__ if hasattr(args, name)}
    results = run_bench(BenchConfig(**fields))
    print(format_table(results))
    return 0
