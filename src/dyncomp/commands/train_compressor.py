"""`dyncomp train-compressor`: train the conditional LoRA on annotated reasoning."""

from __future__ import annotations

import argparse
import json

from dyncomp.commands.common import add_model_options
from dyncomp.training.compressor import TrainCompressorConfig

DEFAULTS = TrainCompressorConfig()


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("train-compressor", help="train the <COMP> LoRA adapter on annotated reasoning")
    add_model_options(parser)
    parser.add_argument("--data", required=True, help="annotated reasoning (.json list with reasoning_with_compression); its fixed train split is used")
    parser.add_argument("--out", required=True, help="folder for the PEFT adapter and its metadata")
    parser.add_argument("--k", type=int, default=DEFAULTS.k, help="<COMP> tokens per compression")
    parser.add_argument("--mode", default=DEFAULTS.mode, choices=["concat", "merge"], help="how memory slots accumulate")
    parser.add_argument("--no-keep-prompt", dest="keep_prompt", action="store_false", help="drop the prompt (all but its first token) at the first compression, as the reference did")
    parser.add_argument("--rank", type=int, default=DEFAULTS.rank, help="LoRA rank")
    parser.add_argument("--alpha", type=int, default=DEFAULTS.alpha, help="LoRA alpha")
    parser.add_argument("--dropout", type=float, default=DEFAULTS.dropout, help="LoRA dropout")
    parser.add_argument("--task-lora", action="store_true", help="also train an ordinary LoRA on every token, for base models that first need the task")
    parser.add_argument("--max-length", type=int, default=DEFAULTS.max_length, help="longest sequence in tokens; longer traces are counted and left out")
    parser.add_argument("--epochs", type=float, default=DEFAULTS.epochs, help="passes over the training split")
    parser.add_argument("--max-steps", type=int, default=DEFAULTS.max_steps, help="stop after this many optimizer steps (overrides --epochs when positive)")
    parser.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size, help="sequences per device and step")
    parser.add_argument("--grad-accum", type=int, default=DEFAULTS.grad_accum, help="gradient accumulation steps")
    parser.add_argument("--learning-rate", type=float, default=DEFAULTS.learning_rate, help="peak learning rate (cosine schedule)")
    parser.add_argument("--warmup", type=float, default=DEFAULTS.warmup, help="warm-up: a fraction of all steps if below 1, else a step count")
    parser.add_argument("--eval-steps", type=int, default=DEFAULTS.eval_steps, help="validation loss every N steps")
    parser.add_argument("--save-steps", type=int, default=DEFAULTS.save_steps, help="checkpoint every N steps")
    parser.add_argument("--limit", type=int, default=DEFAULTS.limit, help="use only the first N training traces")
    parser.add_argument("--seed", type=int, default=DEFAULTS.seed, help="seed for the split, initialisation and data order")
    parser.add_argument("--report-to", default=DEFAULTS.report_to, help="Trainer logging integrations: none, wandb, tensorboard, mlflow")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in OUT/checkpoints")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from dyncomp.training.compressor import train_compressor

    fields = {name: getattr(args, name) for name in TrainCompressorConfig.__dataclass_fields__ if hasattr(args, name)}
    summary = train_compressor(TrainCompressorConfig(**fields))
    shown = {key: summary[key] for key in ("train_traces", "steps", "train_loss", "validation_loss", "train_seconds")}
    shown["left_out_too_long"] = len(summary["too_long_train_ids"])
    print(json.dumps(shown, indent=2))
    return 0
