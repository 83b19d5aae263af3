"""Options shared by several subcommands, with one source of defaults."""

from __future__ import annotations

import argparse

from dyncomp.models.loading import DEFAULT_MODEL


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"a Hub id, a local Hugging Face folder, a .gguf file, or '{DEFAULT_MODEL}' (the packaged default)",
    )
    parser.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda:0 (default: cuda when available)")
    parser.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"], help="weights dtype (default: fp32 on CPU, bf16 on CUDA)")


def add_data_range_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--offset", type=int, default=0, help="skip this many problems first")
    parser.add_argument("--limit", type=int, default=None, help="use at most this many problems")
