"""`dyncomp train-classifier`: train the probe that predicts where `<COMP>` goes."""

from __future__ import annotations

import argparse
import json

from dyncomp.classifier.probe import FEATURE_MODES, PROBE_KINDS
from dyncomp.classifier.train import TrainClassifierConfig
from dyncomp.commands.common import add_model_options

DEFAULTS = TrainClassifierConfig()


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("train-classifier", help="train the <COMP>-position classifier on annotated reasoning")
    add_model_options(parser)
    parser.add_argument("--compressor", default=DEFAULTS.compressor, help="trained compressor folder; without it an untrained adapter computes the features")
    parser.add_argument("--data", required=True, help="annotated reasoning (.json list with reasoning_with_compression); its fixed train and validation splits are used")
    parser.add_argument("--out", required=True, help="folder for the classifier (probe.safetensors, classifier.json)")
    parser.add_argument(
        "--features", default=DEFAULTS.features, choices=FEATURE_MODES,
        help="compressed: hidden states under compression at the annotated <COMP> points, as seen while generating; "
        "uncompressed: hidden states of the plain text, as the reference implementation used",
    )
    parser.add_argument("--probe", default=DEFAULTS.probe, choices=PROBE_KINDS, help="mlp (hidden -> width -> 1) or linear (hidden -> 1)")
    parser.add_argument("--hidden", type=int, default=DEFAULTS.hidden, help="width of the MLP's hidden layer (default: the model's hidden size)")
    parser.add_argument("--dropout", type=float, default=DEFAULTS.dropout, help="dropout after the MLP's hidden layer")
    parser.add_argument("--limit", type=int, default=DEFAULTS.limit, help="use only the first N traces of the train split and of the validation split")
    parser.add_argument("--max-length", type=int, default=DEFAULTS.max_length, help="maximum sequence length in tokens, <COMP> included; longer traces are counted and left out")
    parser.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size, help="sequences per forward pass of feature extraction")
    parser.add_argument("--probe-batch-size", type=int, default=DEFAULTS.probe_batch_size, help="feature rows per probe training step")
    parser.add_argument("--epochs", type=int, default=DEFAULTS.epochs, help="maximum passes over the training features")
    parser.add_argument("--patience", type=int, default=DEFAULTS.patience, help="stop after this many epochs without a better validation AUPRC")
    parser.add_argument("--learning-rate", type=float, default=DEFAULTS.learning_rate, help="AdamW learning rate")
    parser.add_argument("--weight-decay", type=float, default=DEFAULTS.weight_decay, help="AdamW weight decay")
    parser.add_argument("--seed", type=int, default=DEFAULTS.seed, help="seed for the data split, probe initialisation and batch order")
    parser.add_argument("--feature-cache", default=DEFAULTS.feature_cache, help="folder for cached features (default: classifier-features in the dyncomp cache folder, $DYNCOMP_CACHE)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from dyncomp.classifier.train import train_classifier

    fields = {name: getattr(args, name) for name in TrainClassifierConfig.__dataclass_fields__ if hasattr(args, name)}
    summary = train_classifier(TrainClassifierConfig(**fields))
    validation = summary["validation"]
    shown = {
        "train_traces": summary["train_traces"],
        "validation_traces": summary["validation_traces"],
        "epochs_run": summary["epochs_run"],
        "feature_seconds": summary["feature_seconds"],
        "train_seconds": summary["train_seconds"],
        "validation_auroc": validation["auroc"],
        "validation_auprc": validation["auprc"],
        "chosen_tau": validation["chosen_tau"],
        "tau_rule": validation["tau_rule"],
    }
    print(json.dumps(shown, indent=2))
    return 0
