"""Train the `<COMP>`-position probe on cached features, sweep τ, and evaluate a saved classifier.

The probe trains with a class-weighted BCE loss (positive weight = negatives / positives, because
few reasoning tokens precede a `<COMP>`: 1.8% in the 900 training traces of the GPT-4o-mini
GSM8K annotations, with SmolLM2's tokenizer). It stops early when the validation AUPRC stops
improving and keeps the best epoch's weights. τ is then chosen on the validation
split by the rule in `TAU_RULE`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dyncomp.classifier.features import (
    FeatureSet,
    compressor_fingerprint,
    load_or_extract_features,
    model_source_record,
)
from dyncomp.classifier.probe import FEATURE_MODES, PROBE_KINDS, ClassifierInfo, Probe, ProbeConfig, TrainedClassifier, load_classifier, save_classifier
from dyncomp.errors import UserError
from dyncomp.models.loading import DEFAULT_MODEL
from dyncomp.models.tokens import token_record

logger = logging.getLogger(__name__)

THRESHOLDS = tuple(round(0.5 + 0.05 * step, 2) for step in range(10))
"""τ values swept for precision, recall and F1: 0.5 to 0.95 in steps of 0.05."""
TAU_RULE = "max F1 on the validation split over tau 0.50-0.95 (step 0.05); ties go to the larger tau"


@dataclass
class TrainClassifierConfig:
    """Settings of `dyncomp train-classifier`; the CLI takes its defaults from here."""

    data: str = ""
    out: str = ""
    model: str = DEFAULT_MODEL
    compressor: str | None = None
    """Trained compressor folder, or None for an untrained adapter."""
    features: str = "compressed"
    probe: str = "mlp"
    hidden: int | None = None
    """Width of the MLP's hidden layer, or None for the model's hidden size."""
    dropout: float = 0.1
    limit: int | None = None
    """Use only the first N traces of the train and of the validation split."""
    max_length: int = 768
    batch_size: int = 4
    """Sequences per forward pass of feature extraction."""
    probe_batch_size: int = 1024
    epochs: int = 10
    patience: int = 3
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    seed: int = 0
    feature_cache: str | None = None
    device: str | None = None
    dtype: str | None = None

    def validate(self) -> None:
        if not self.data:
            raise UserError("missing --data: give an annotated reasoning file")
        if not self.out:
            raise UserError("missing --out: give a folder for the trained classifier")
        if self.features not in FEATURE_MODES:
            raise UserError(f"unknown --features '{self.features}'; use one of {', '.join(FEATURE_MODES)}")
        if self.probe not in PROBE_KINDS:
            raise UserError(f"unknown --probe '{self.probe}'; use one of {', '.join(PROBE_KINDS)}")
        positive = {"epochs": self.epochs, "patience": self.patience, "probe_batch_size": self.probe_batch_size, "batch_size": self.batch_size}
        for name, value in positive.items():
            if value < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if self.limit is not None and self.limit < 1:
            raise UserError(f"--limit must be at least 1, got {self.limit}")
        if self.hidden is not None and self.hidden < 1:
            raise UserError(f"--hidden must be at least 1, got {self.hidden}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.learning_rate <= 0:
            raise UserError(f"--learning-rate must be positive, got {self.learning_rate}")


@dataclass
class EvalClassifierConfig:
    """Settings of `dyncomp eval-classifier`; the CLI takes its defaults from here."""

    classifier: str = ""
    data: str = ""
    out: str = ""
    split: str = "test"
    features: str | None = None
    """Feature mode to evaluate on, or None for the mode the classifier was trained on."""
    limit: int | None = None
    batch_size: int = 4
    seed: int = 0
    """Seed of the train/validation/test split, which must be the one used in training."""
    feature_cache: str | None = None
    device: str | None = None
    dtype: str | None = None


# ---------------------------------------------------------------------------
# Metrics


def score_predictions(probabilities: torch.Tensor, features: FeatureSet) -> dict:
    """Return AUROC, AUPRC and, for each τ in `THRESHOLDS`, precision, recall, F1 and markers per sample.

    `probabilities` has shape (positions,), aligned with `features.labels`. A predicted marker is a
    position with probability >= τ, counted per sample (trace) without the policy's minimum step length.
    """
    from sklearn.metrics import average_precision_score, roc_auc_score

    labels = features.labels.numpy()
    scores = probabilities.double().numpy()
    both_classes = 0 < labels.sum() < len(labels)
    gold = features.gold_markers().double()  # (samples,)
    metrics = {
        "positions": int(len(labels)),
        "positives": int(labels.sum()),
        "samples": features.num_samples,
        "auroc": float(roc_auc_score(labels, scores)) if both_classes else math.nan,
        "auprc": float(average_precision_score(labels, scores)) if both_classes else math.nan,
        "gold_markers_per_sample": float(gold.mean()) if features.num_samples else math.nan,
        "thresholds": [],
    }
    if not both_classes:
        logger.warning("the labels hold one class only (%d positives of %d); AUROC and AUPRC are undefined", labels.sum(), len(labels))

    for tau in THRESHOLDS:
        predicted = probabilities >= tau
        true_positives = int((predicted & features.labels).sum())
        predicted_count = int(predicted.sum())
        precision = true_positives / predicted_count if predicted_count else math.nan
        recall = true_positives / metrics["positives"] if metrics["positives"] else math.nan
        f1 = 2 * true_positives / (predicted_count + metrics["positives"]) if predicted_count + metrics["positives"] else math.nan
        markers = torch.bincount(features.sample_index, weights=predicted.double(), minlength=features.num_samples)  # (samples,)
        metrics["thresholds"].append({
            "tau": tau,
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "markers_per_sample": float(markers.mean()),
            "marker_count_abs_error": float((markers - gold).abs().mean()),
        })
    return metrics


def json_safe(value):
    """Return `value` with NaN floats replaced by None, so the JSON written is standard."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def choose_tau(metrics: dict) -> float:
    """Return the τ that `TAU_RULE` picks from the sweep of `score_predictions`, or 0.5 when no F1 is defined."""
    best_tau, best_f1 = THRESHOLDS[0], -1.0
    for row in metrics["thresholds"]:
        if not math.isnan(row["f1"]) and row["f1"] >= best_f1:
            best_tau, best_f1 = row["tau"], row["f1"]
    return best_tau


def format_report(metrics: dict, title: str, context: str) -> str:
    """Render a metrics dict as markdown: a summary line and the τ table, with the chosen τ marked."""
    lines = [
        f"# {title}",
        "",
        context,
        "",
        f"AUROC {metrics['auroc']:.4f}, AUPRC {metrics['auprc']:.4f} over {metrics['positions']} reasoning tokens "
        f"({metrics['positives']} before a `<COMP>`) of {metrics['samples']} samples; "
        f"{metrics['gold_markers_per_sample']:.2f} annotated markers per sample.",
        "",
        f"Chosen τ = {metrics['chosen_tau']:.2f} ({metrics['tau_rule']}).",
        "",
        "| τ | precision | recall | F1 | markers per sample | gold per sample | mean abs count error |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in metrics["thresholds"]:
        mark = " (chosen)" if math.isclose(row["tau"], metrics["chosen_tau"]) else ""
        lines.append(
            f"| {row['tau']:.2f}{mark} | {row['precision']:.3f} | {row['recall']:.3f} | {row['f1']:.3f} | "
            f"{row['markers_per_sample']:.2f} | {metrics['gold_markers_per_sample']:.2f} | {row['marker_count_abs_error']:.2f} |"
        )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# Training


@torch.no_grad()
def predict(probe: Probe, features: torch.Tensor, batch_size: int = 8192) -> torch.Tensor:
    """Return probabilities (positions,) for features (positions, hidden), on the CPU."""
    probe.eval()
    device = probe.feature_mean.device
    chunks = [probe.probability(features[start : start + batch_size].to(device)).cpu() for start in range(0, len(features), batch_size)]
    return torch.cat(chunks) if chunks else torch.zeros(0)


def train_probe(
    train: FeatureSet,
    validation: FeatureSet,
    probe_config: ProbeConfig,
    *,
    epochs: int = 10,
    patience: int = 3,
    batch_size: int = 1024,
    learning_rate: float = 1e-3,
    weight_decay: float = 0.01,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> tuple[Probe, list[dict]]:
    """Train a probe and return the weights of its best validation-AUPRC epoch with the per-epoch history.

    Training stops after `patience` epochs without a better validation AUPRC.
    """
    from sklearn.metrics import average_precision_score

    positives = int(train.labels.sum())
    negatives = len(train.labels) - positives
    if positives == 0 or negatives == 0:
        raise UserError(f"the training features hold {positives} positions before a <COMP> and {negatives} others; both classes are needed")
    if int(validation.labels.sum()) == 0:
        raise UserError("the validation split has no position before a <COMP>, so early stopping has nothing to measure; check the annotated data")

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    features = train.features.float()  # (positions, hidden)
    targets = train.labels.float()  # (positions,)
    probe = Probe(probe_config)
    probe.set_normalization(features.mean(dim=0), features.std(dim=0))
    probe.to(device)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=learning_rate, weight_decay=weight_decay)
    loss_function = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(negatives / positives, device=device))

    history: list[dict] = []
    best_auprc, best_state, stale_epochs = -1.0, None, 0
    progress = tqdm(range(1, epochs + 1), desc="train probe", unit="epoch", leave=False)
    for epoch in progress:
        probe.train()
        order = torch.randperm(len(features), generator=generator)
        total_loss = 0.0
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            loss = loss_function(probe(features[rows].to(device)), targets[rows].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += float(loss.detach()) * len(rows)

        auprc = float(average_precision_score(validation.labels.numpy(), predict(probe, validation.features).double().numpy()))
        history.append({"epoch": epoch, "train_loss": total_loss / len(order), "validation_auprc": auprc})
        progress.set_postfix(validation_auprc=f"{auprc:.4f}")
        if auprc > best_auprc:
            best_auprc, best_state, stale_epochs = auprc, copy.deepcopy(probe.state_dict()), 0
        else:
            stale_epochs += 1
            if stale_epochs >= patience:
                logger.info("stopping after epoch %d: validation AUPRC has not improved for %d epochs", epoch, patience)
                break

    probe.load_state_dict(best_state)
    probe.eval()
    return probe, history


def _load_splits(path: str, splits: tuple[str, ...], seed: int, limit: int | None) -> list[list]:
    from dyncomp.data.annotated import load_annotated, split_annotated

    examples = load_annotated(path)
    chosen = []
    for split in splits:
        part = split_annotated(examples, split, seed=seed)[:limit]
        if not part:
            raise UserError(f"the {split} split of {path} is empty; pass a larger annotated file")
        chosen.append(part)
    return chosen


def train_classifier(config: TrainClassifierConfig) -> dict:
    """Extract (or reuse) features, train the probe, choose τ, and save the classifier to `config.out`.

    Returns a summary (trace counts, history, validation metrics, timings), also written to
    `training_summary.json` in the output folder.
    """
    from dyncomp.classifier.probe import CONFIG_FILE
    from dyncomp.models.compressed import load_compressed_model

    config.validate()
    out = Path(config.out)
    if (out / CONFIG_FILE).is_file():
        raise UserError(f"{out} already contains a trained classifier; choose another --out or delete it")
    train_examples, validation_examples = _load_splits(config.data, ("train", "validation"), config.seed, config.limit)

    loaded = load_compressed_model(config.model, config.compressor, device=config.device, dtype=config.dtype)
    if config.compressor is None and config.features == "compressed":
        logger.warning("no --compressor given: compressed features come from an untrained adapter, unlike those seen during generation")
    extraction = dict(compressor=config.compressor, mode=config.features, max_length=config.max_length, batch_size=config.batch_size, cache=config.feature_cache)
    started = time.perf_counter()
    train = load_or_extract_features(loaded, train_examples, description="train features", **extraction)
    validation = load_or_extract_features(loaded, validation_examples, description="validation features", **extraction)
    feature_seconds = time.perf_counter() - started

    text_config = loaded.model.config.get_text_config() if hasattr(loaded.model.config, "get_text_config") else loaded.model.config
    probe_config = ProbeConfig(input_size=train.features.shape[1], kind=config.probe, hidden=config.hidden, dropout=config.dropout)
    probe_config.validate()
    started = time.perf_counter()
    probe, history = train_probe(
        train, validation, probe_config,
        epochs=config.epochs, patience=config.patience, batch_size=config.probe_batch_size,
        learning_rate=config.learning_rate, weight_decay=config.weight_decay, seed=config.seed,
    )
    train_seconds = time.perf_counter() - started

    validation_metrics = score_predictions(predict(probe, validation.features), validation)
    tau = choose_tau(validation_metrics)
    validation_metrics.update(chosen_tau=tau, tau_rule=TAU_RULE)
    record = token_record(loaded.model, loaded.tokenizer, loaded.comp, model_source_record(config.model))
    info = ClassifierInfo(
        probe=probe_config,
        record=record,
        compressor=compressor_fingerprint(config.compressor),
        feature_mode=config.features,
        tau=tau,
        tau_rule=TAU_RULE,
        num_hidden_layers=text_config.num_hidden_layers,
        max_length=config.max_length,
        dtype=str(next(loaded.model.parameters()).dtype),
        training={
            "data": str(Path(config.data).resolve()),
            "seed": config.seed,
            "train_traces": train.num_samples,
            "validation_traces": validation.num_samples,
            "validation_auroc": validation_metrics["auroc"],
            "validation_auprc": validation_metrics["auprc"],
        },
    )
    save_classifier(out, probe, info)

    summary = {
        "config": dataclasses.asdict(config),
        "train_traces": train.num_samples,
        "validation_traces": validation.num_samples,
        "train_positions": len(train.labels),
        "train_positives": int(train.labels.sum()),
        "left_out_train_ids": train.left_out_ids,
        "left_out_validation_ids": validation.left_out_ids,
        "feature_keys": {"train": train.key, "validation": validation.key},
        "feature_seconds": round(feature_seconds, 1),
        "train_seconds": round(train_seconds, 1),
        "epochs_run": len(history),
        "history": history,
        "validation": validation_metrics,
        "torch_threads": torch.get_num_threads(),
    }
    (out / "training_summary.json").write_text(json.dumps(json_safe(summary), indent=2) + "\n")
    context = f"Classifier `{out}` ({config.probe} probe, {config.features} features), validation split of `{config.data}`."
    (out / "validation_report.md").write_text(format_report(validation_metrics, "Classifier validation", context))
    return summary


# ---------------------------------------------------------------------------
# Evaluation


def load_classifier_model(classifier: TrainedClassifier, device: str | None = None, dtype: str | None = None):
    """Load the base model and compressor recorded in a classifier, and check that both still match it."""
    from dyncomp.models.compressed import load_compressed_model

    compressor = None
    if classifier.info.compressor:
        # Saved relative to the classifier folder; older records hold an absolute path.
        compressor = str((Path(classifier.path) / classifier.info.compressor["path"]).resolve())
    classifier.check_compressor(compressor)
    k = len(classifier.info.record["comp_tokens"]["ids"])
    loaded = load_compressed_model(classifier.info.base_model, compressor, device=device, dtype=dtype, k=k)
    classifier.check_model(loaded.model, loaded.tokenizer, loaded.comp, classifier.info.base_model)
    return loaded, compressor


def evaluate_classifier(config: EvalClassifierConfig) -> dict:
    """Score a saved classifier on one split of annotated data and return the metrics that eval-classifier writes to `metrics.json`."""
    classifier = load_classifier(config.classifier)
    mode = config.features or classifier.info.feature_mode
    if mode not in FEATURE_MODES:
        raise UserError(f"unknown --features '{mode}'; use one of {', '.join(FEATURE_MODES)}")
    if config.limit is not None and config.limit < 1:
        raise UserError(f"--limit must be at least 1, got {config.limit}")
    (examples,) = _load_splits(config.data, (config.split,), config.seed, config.limit)

    loaded, compressor = load_classifier_model(classifier, device=config.device, dtype=config.dtype)
    features = load_or_extract_features(
        loaded, examples, compressor=compressor, mode=mode, max_length=classifier.info.max_length,
        batch_size=config.batch_size, cache=config.feature_cache, description=f"{config.split} features",
    )
    metrics = score_predictions(predict(classifier.probe, features.features), features)
    metrics.update(chosen_tau=classifier.info.tau, tau_rule=classifier.info.tau_rule)
    metrics["at_chosen_tau"] = next((row for row in metrics["thresholds"] if math.isclose(row["tau"], classifier.info.tau)), None)
    metrics["context"] = {
        "classifier": str(Path(config.classifier).resolve()),
        "base_model": classifier.info.base_model,
        "compressor": classifier.info.compressor,
        "trained_feature_mode": classifier.info.feature_mode,
        "feature_mode": mode,
        "probe": dataclasses.asdict(classifier.info.probe),
        "data": str(Path(config.data).resolve()),
        "split": config.split,
        "left_out_ids": features.left_out_ids,
    }
    return metrics
