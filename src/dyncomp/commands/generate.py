"""`dyncomp generate`: stream a model's reasoning for one question."""

from __future__ import annotations

import argparse
import sys

from dyncomp.commands.common import add_model_options


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("generate", help="stream a model's step-by-step answer to one question")
    parser.add_argument("question", nargs="?", help="the problem text (or use --data and --index)")
    parser.add_argument("--data", default=None, help="a GSM8K .jsonl or .json file to take the question from")
    parser.add_argument("--index", type=int, default=0, help="which problem of --data to answer (0-based)")
    add_model_options(parser)
    parser.add_argument("--max-new-tokens", type=int, default=256, help="stop after this many generated tokens")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 decodes greedily")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --temperature > 0)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for sampling")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import torch
    from transformers import TextStreamer

    from dyncomp.data.gsm8k import extract_answer, is_correct, load_gsm8k
    from dyncomp.errors import UserError
    from dyncomp.models import load_model
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

    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    tokenizer, model = loaded.tokenizer, loaded.model
    prompt = format_prompt(tokenizer, question)
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(model.device)

    torch.manual_seed(args.seed)
    sampling = args.temperature > 0
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    with torch.inference_mode():
        output = model.generate(
            **inputs,
            max_new_tokens=args.max_new_tokens,
            do_sample=sampling,
            temperature=args.temperature if sampling else None,
            top_p=args.top_p if sampling else None,
            top_k=None,
            pad_token_id=tokenizer.pad_token_id,
            streamer=streamer,
        )
    text = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    generated = output.shape[1] - inputs["input_ids"].shape[1]
    verdict = "" if gold is None else f"; gold {gold}, {'correct' if is_correct(text, gold) else 'wrong'}"
    print(f"\n[{generated} tokens; extracted answer: {extract_answer(text)}{verdict}]", file=sys.stderr)
    return 0
