"""`dyncomp generate`: stream a model's reasoning for one question, compressing as it goes."""

from __future__ import annotations

import argparse
import sys

from dyncomp.commands.common import add_model_options
from dyncomp.generation.engine import DecodingConfig

DEFAULTS = DecodingConfig()


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("generate", help="stream a model's step-by-step answer to one question")
    parser.add_argument("question", nargs="?", help="the problem text (or use --data and --index)")
    parser.add_argument("--data", default=None, help="a GSM8K .jsonl or .json file to take the question from")
    parser.add_argument("--index", type=int, default=0, help="which problem of --data to answer (0-based)")
    add_model_options(parser)
    parser.add_argument("--compressor", default=None, help="trained compressor folder; needed by every method but none")
    parser.add_argument("--classifier", default=None, help="trained classifier folder, for --method classifier")
    parser.add_argument("--method", default="none", help="when to compress: none, newline, interval:N, classifier, classifier:τ")
    parser.add_argument("--min-step-tokens", type=int, default=8, help="shortest step a policy may compress")
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULTS.max_new_tokens, help="stop after this many generated tokens")
    parser.add_argument("--temperature", type=float, default=DEFAULTS.temperature, help="sampling temperature; 0 decodes greedily")
    parser.add_argument("--top-p", type=float, default=DEFAULTS.top_p, help="nucleus sampling mass (with --temperature > 0)")
    parser.add_argument("--seed", type=int, default=DEFAULTS.seed, help="random seed for sampling")
    parser.set_defaults(handler=run)


class _Streamer:
    """Print each row-0 token as it arrives, and the cache size at every compression."""

    def __init__(self, engine, tokenizer):
        self.engine = engine
        self.tokenizer = tokenizer
        self.segment: list[int] = []
        self.printed = 0

    def __call__(self, row: int, token: int, is_comp: bool) -> None:
        if is_comp:
            kib = self.engine.current_row_bytes[0] / 1024 if self.engine.current_row_bytes else 0.0
            sys.stdout.write(f" <COMP kv={kib:.0f}KiB>")
            self.segment, self.printed = [], 0
        else:
            self.segment.append(token)
            text = self.tokenizer.decode(self.segment, skip_special_tokens=True)
            # A multi-byte character can end mid-token; wait until it decodes whole.
            if not text.endswith("\ufffd"):
                sys.stdout.write(text[self.printed :])
                self.printed = len(text)
        sys.stdout.flush()


def run(args: argparse.Namespace) -> int:
    from dyncomp.data.gsm8k import extract_answer, is_correct, load_gsm8k
    from dyncomp.errors import UserError
    from dyncomp.evaluation.harness import EvalConfig, load_for_methods
    from dyncomp.generation.engine import CompressingEngine
    from dyncomp.policies import make_policy
    from dyncomp.prompting import format_prompt

    gold = None
    if args.data is not None:
        if args.question:
            raise UserError("pass either a question or --data, not both")
        problem = load_gsm8k(args.data, offset=args.index, limit=1)[0]
        question, gold = problem.question, problem.gold
        print(f"Question ({args.data}, problem {args.index}):\n{question}\n", file=sys.stderr)
    else:
        question = args.question or ""
    if not question.strip():
        raise UserError("the question is empty; pass the problem text as the argument, or --data FILE")
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")

    load_config = EvalConfig(model=args.model, compressor=args.compressor, classifier=args.classifier, device=args.device, dtype=args.dtype)
    model, tokenizer, comp, keep_prompt, context = load_for_methods(load_config, [args.method])
    policy = make_policy(args.method, min_step_tokens=args.min_step_tokens, **context)
    engine = CompressingEngine(model, tokenizer, comp)
    decoding = DecodingConfig(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed, keep_prompt=keep_prompt,
    )
    result = engine.generate([format_prompt(tokenizer, question)], policy, decoding, on_token=_Streamer(engine, tokenizer))[0]

    verdict = "" if gold is None else f", gold {gold}: {'correct' if is_correct(result.text, gold) else 'wrong'}"
    print(
        f"\n[{result.n_generated} tokens, {result.n_comp} compressions, KV peak {result.kv_bytes_peak / 2**20:.2f} MiB "
        f"of {result.kv_bytes_full / 2**20:.2f} MiB uncompressed; answer {extract_answer(result.text)}{verdict}]",
        file=sys.stderr,
    )
    return 0
