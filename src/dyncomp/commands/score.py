"""`dyncomp score`: teacher-forced NLL and carried-value accuracy per compression method."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from dyncomp.commands.common import add_model_options

DEFAULT_METHODS = "oracle,newline,interval:32,none"


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("score", help="teacher-forced retention (nll, nll_ratio, carried_value_acc) per method")
    add_model_options(parser)
    parser.add_argument("--compressor", default=None, help="trained compressor folder; without it an untrained adapter is scored")
    parser.add_argument("--data", required=True, help="annotated reasoning (.json list with reasoning_with_compression)")
    parser.add_argument("--split", default="test", choices=["train", "validation", "test", "all"], help="which fixed split of --data to score")
    parser.add_argument("--methods", default=DEFAULT_METHODS, help="comma-separated methods: oracle, newline, interval:N, none")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N traces of the split")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per forward pass")
    parser.add_argument("--min-step-tokens", type=int, default=8, help="shortest step a policy may compress")
    parser.add_argument("--out", required=True, help="folder for metrics.json and report.md")
    parser.set_defaults(handler=run)


def format_table(results: dict[str, dict]) -> str:
    lines = ["| method | n | avg `<COMP>` | nll | nll_ratio | carried_value_acc |", "| --- | --- | --- | --- | --- | --- |"]
    for method, m in results.items():
        carried = "n/a" if math.isnan(m["carried_value_acc"]) else f"{m['carried_value_acc']:.3f}"
        lines.append(f"| {method} | {m['n']} | {m['avg_comp']:.2f} | {m['nll']:.4f} | {m['nll_ratio']:.3f} | {carried} |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from dyncomp.data.annotated import load_annotated, split_annotated
    from dyncomp.errors import UserError
    from dyncomp.evaluation.retention import score_methods
    from dyncomp.models.compressed import load_compressed_model
    from dyncomp.policies import make_policy, parse_methods
    from dyncomp.training.encoding import tokenize_reasoning

    methods = parse_methods(args.methods)
    for method in methods:
        make_policy(method)
    examples = split_annotated(load_annotated(args.data), args.split)
    if args.limit is not None:
        examples = examples[: args.limit]
    if not examples:
        raise UserError(f"the {args.split} split of {args.data} is empty; choose another --split")

    loaded = load_compressed_model(args.model, args.compressor, device=args.device, dtype=args.dtype)
    reasonings = [tokenize_reasoning(loaded.tokenizer, e.id, e.question, e.steps()) for e in examples]
    results = score_methods(
        loaded.model, loaded.tokenizer, loaded.comp, reasonings, methods,
        mode=loaded.config.mode, keep_prompt=loaded.config.keep_prompt,
        batch_size=args.batch_size, min_step_tokens=args.min_step_tokens,
    )

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    context = {"model": args.model, "compressor": args.compressor, "data": args.data, "split": args.split, "n": len(examples)}
    (out / "metrics.json").write_text(json.dumps({"context": context, "methods": results}, indent=2))
    table = format_table(results)
    compressor = args.compressor or "untrained adapter"
    (out / "report.md").write_text(f"# Teacher-forced retention\n\nModel `{args.model}`, compressor `{compressor}`, {args.data} ({args.split}, {len(examples)} traces).\n\n{table}\n")
    print(table)
    return 0
