"""`dyncomp eval`: accuracy, memory and speed of each method on GSM8K problems."""

from __future__ import annotations

import argparse

from dyncomp.commands.common import add_data_range_options, add_model_options
from dyncomp.evaluation.harness import EvalConfig

DEFAULTS = EvalConfig()


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="generate under each method and report accuracy, KV memory and speed")
    add_model_options(parser)
    parser.add_argument("--compressor", default=None, help="trained compressor folder (needed by every method but none)")
    parser.add_argument("--classifier", default=None, help="trained classifier folder (needed by classifier:τ)")
    parser.add_argument("--data", required=True, help="GSM8K .jsonl or .json (question, answer), or openai/gsm8k when online")
    add_data_range_options(parser)
    parser.add_argument("--methods", default=DEFAULTS.methods, help="comma-separated: none, newline, newline:blank, interval:N, classifier, classifier:τ")
    parser.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size, help="problems decoded together")
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULTS.max_new_tokens, help="generated tokens per problem, <COMP> excluded")
    parser.add_argument("--min-step-tokens", type=int, default=DEFAULTS.min_step_tokens, help="shortest step a policy may compress")
    parser.add_argument("--temperature", type=float, default=DEFAULTS.temperature, help="sampling temperature; 0 decodes greedily")
    parser.add_argument("--top-p", type=float, default=DEFAULTS.top_p, help="nucleus sampling mass")
    parser.add_argument("--seed", type=int, default=DEFAULTS.seed, help="sampling seed")
    parser.add_argument("--annotated", default=None, help="annotated reasoning; its test split adds nll, nll_ratio and carried_value_acc per method")
    parser.add_argument("--annotated-limit", type=int, default=None, help="score only the first N annotated test traces")
    parser.add_argument("--shard", default=None, help="i/n: this process takes every n-th problem from i; combine with eval-merge")
    parser.add_argument("--profile", action="store_true", help="also write a torch.profiler trace of 32 decoding steps per method")
    parser.add_argument("--out", required=True, help="folder for samples.jsonl, metrics.json, report.md and pareto.png")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from dyncomp.evaluation.harness import run_eval
    from dyncomp.evaluation.report import format_table

    fields = {name: getattr(args, name) for name in EvalConfig.__dataclass_fields__ if hasattr(args, name)}
    results = run_eval(EvalConfig(**fields))
    print(format_table(results))
    return 0
