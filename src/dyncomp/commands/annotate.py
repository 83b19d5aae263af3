"""`dyncomp annotate`: write `<COMP>`-annotated reasoning for GSM8K problems."""

from __future__ import annotations

import argparse
import logging

from dyncomp.commands.common import add_data_range_options
from dyncomp.data.annotate import API_KEY_ENV, METHODS, AnnotateConfig
from dyncomp.data.gsm8k import HUB_ID


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "annotate",
        help="mark reasoning steps of GSM8K solutions with <COMP>",
        description=(
            "Write GSM8K reasoning with <COMP> markers at step boundaries, as a JSON list. "
            "'rules' marks each line of the reference solution and needs nothing. "
            "'llm' sends each reference solution to an OpenAI-compatible endpoint for a rewrite, records "
            "each result in a progress file next to the output (out.json gets out.partial.jsonl), "
            "and resumes from that file when rerun."
        ),
    )
    parser.add_argument("--input", required=True, help=f"a GSM8K .jsonl or .json file with question and answer fields, or {HUB_ID} (train split) when online")
    parser.add_argument("--method", required=True, choices=METHODS, help="how to place the markers")
    parser.add_argument("--out", required=True, help="the output .json file")
    add_data_range_options(parser)

    llm = parser.add_argument_group("llm method")
    llm.add_argument("--api-base", default=AnnotateConfig.api_base, help="base URL of an OpenAI-compatible API, e.g. http://127.0.0.1:8000/v1")
    llm.add_argument("--api-model", default=AnnotateConfig.api_model, help=f"model name on that endpoint (the API key is read from ${API_KEY_ENV})")
    llm.add_argument("--concurrency", type=int, default=AnnotateConfig.concurrency, help="number of requests in flight at once (default: %(default)s)")
    llm.add_argument(
        "--max-retries",
        type=int,
        default=AnnotateConfig.max_retries,
        help="retries per request after a timeout, a connection error, HTTP 429 or 5xx, with exponential backoff (default: %(default)s)",
    )
    llm.add_argument("--timeout", type=float, default=AnnotateConfig.timeout, help="seconds before one request times out (default: %(default)s)")
    llm.add_argument(
        "--temperature",
        type=parse_temperature,
        default=AnnotateConfig.temperature,
        help=(
            "sampling temperature sent with each request, or 'none' to send none, "
            "since some reasoning models accept only their default (default: %(default)s)"
        ),
    )
    llm.add_argument(
        "--retry-rejected",
        action="store_true",
        help="query again the problems whose earlier rewrite was rejected (by default a rerun skips them)",
    )
    parser.set_defaults(handler=run)


def parse_temperature(text: str) -> float | None:
    if text.lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'none', got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    from dyncomp.data.annotate import annotate

    if not args.verbose:
        # The openai client's HTTP library logs every request at INFO, which buries the
        # progress bar. It is httpx, or its fork httpx2 in some openai releases.
        for name in ("httpx", "httpx2"):
            logging.getLogger(name).setLevel(logging.WARNING)

    config = AnnotateConfig(
        input=args.input,
        out=args.out,
        method=args.method,
        offset=args.offset,
        limit=args.limit,
        api_base=args.api_base,
        api_model=args.api_model,
        concurrency=args.concurrency,
        max_retries=args.max_retries,
        timeout=args.timeout,
        retry_rejected=args.retry_rejected,
        temperature=args.temperature,
    )
    summary = annotate(config)

    print(f"wrote {summary.written} records to {summary.out}")
    if summary.progress is not None:
        print(
            f"queried {summary.queried} problems, reused {summary.reused} finished earlier, "
            f"rejected {summary.rejected}; progress and rejection reasons are in {summary.progress}"
        )
    if summary.without_marker:
        print(f"{summary.without_marker} records have no <COMP> marker")
    return 0
