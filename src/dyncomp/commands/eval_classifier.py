"""`dyncomp eval-classifier`: AUROC, AUPRC and the τ sweep of a trained classifier on one split."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dyncomp.classifier.probe import FEATURE_MODES
from dyncomp.classifier.train import EvalClassifierConfig

DEFAULTS = EvalClassifierConfig()


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("eval-classifier", help="score a trained <COMP>-position classifier on annotated reasoning")
    parser.add_argument("--classifier", required=True, help="classifier folder written by train-classifier; its model and compressor are reloaded from it")
    parser.add_argument("--data", required=True, help="annotated reasoning (.json list with reasoning_with_compression)")
    parser.add_argument("--split", default=DEFAULTS.split, choices=["train", "validation", "test", "all"], help="which fixed split of --data to score")
    parser.add_argument("--out", required=True, help="folder for metrics.json and report.md")
    parser.add_argument("--features", default=DEFAULTS.features, choices=FEATURE_MODES, help="feature mode to score on (default: the mode the classifier was trained on)")
    parser.add_argument("--limit", type=int, default=DEFAULTS.limit, help="score only the first N traces of the split")
    parser.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size, help="sequences per forward pass of feature extraction")
    parser.add_argument("--seed", type=int, default=DEFAULTS.seed, help="seed of the data split; keep the one the classifier was trained with")
    parser.add_argument("--feature-cache", default=DEFAULTS.feature_cache, help="folder for cached features (default: classifier-features in the dyncomp cache folder, $DYNCOMP_CACHE)")
    parser.add_argument("--device", default=DEFAULTS.device, help="torch device, e.g. cpu or cuda:0 (default: cuda when available)")
    parser.add_argument("--dtype", default=DEFAULTS.dtype, choices=["fp32", "bf16", "fp16"], help="weights dtype (default: fp32 on CPU, bf16 on CUDA)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from dyncomp.classifier.train import evaluate_classifier, format_report, json_safe

    fields = {name: getattr(args, name) for name in EvalClassifierConfig.__dataclass_fields__ if hasattr(args, name)}
    metrics = evaluate_classifier(EvalClassifierConfig(**fields))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(json_safe(metrics), indent=2) + "\n")
    context = metrics["context"]
    description = (
        f"Classifier `{context['classifier']}` (trained on {context['trained_feature_mode']} features), "
        f"scored on {context['feature_mode']} features of `{context['data']}` ({context['split']} split)."
    )
    report = format_report(metrics, "Classifier evaluation", description)
    (out / "report.md").write_text(report)
    print(report)
    return 0
