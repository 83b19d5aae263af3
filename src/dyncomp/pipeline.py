"""`dyncomp pipeline`: train-compressor, train-classifier and eval from one YAML file.

Each stage is skipped when its output already exists and loads; eval resumes from its records.
The YAML has top-level `model`, `annotated` (annotated reasoning) and `gsm8k` (problems to
evaluate), and one section per stage whose keys are the fields of that stage's config
dataclass (`TrainCompressorConfig`, `TrainClassifierConfig`, `EvalConfig`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

from dyncomp.errors import UserError

logger = logging.getLogger(__name__)

STAGES = ("compressor", "classifier", "eval")


def read_config(path: str) -> dict:
    import yaml

    file = Path(path)
    if not file.is_file():
        raise UserError(f"pipeline config not found: {path}; pass a YAML file such as configs/smollm2-gsm8k-smoke.yaml")
    try:
        config = yaml.safe_load(file.read_text())
    except yaml.YAMLError as error:
        raise UserError(f"{path} is not valid YAML ({str(error).splitlines()[0]})") from error
    if not isinstance(config, dict):
        raise UserError(f"{path} must hold a mapping with model, annotated, gsm8k, compressor, classifier and eval")
    for key in ("annotated", "gsm8k", *STAGES):
        if key not in config:
            raise UserError(f"{path} has no '{key}' entry; see configs/smollm2-gsm8k.yaml for the layout")
    return config


def _stage_config(cls, section: dict, common: dict, name: str, path: str):
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(section) - fields)
    if unknown:
        raise UserError(f"{path}: unknown key(s) {', '.join(unknown)} in '{name}'; valid keys are {', '.join(sorted(fields))}")
    values = {key: value for key, value in common.items() if key in fields}
    values.update(section)
    return cls(**values)


def run_pipeline(path: str, device: str | None = None) -> dict:
    """Run the stages in order and return the eval metrics."""
    from dyncomp.classifier.train import TrainClassifierConfig, train_classifier
    from dyncomp.evaluation.harness import EvalConfig, run_eval
    from dyncomp.training.compressor import TrainCompressorConfig, train_compressor

    config = read_config(path)
    model = config.get("model", "smollm2-135m-instruct")
    common = {"model": model, "device": device}

    # Every section is checked before any stage starts, so a typo does not cost a training run.
    compressor = _stage_config(TrainCompressorConfig, config["compressor"] or {}, {**common, "data": config["annotated"]}, "compressor", path)
    compressor_dir = Path(compressor.out)
    classifier = _stage_config(
        TrainClassifierConfig, config["classifier"] or {},
        {**common, "data": config["annotated"], "compressor": str(compressor_dir)}, "classifier", path,
    )
    evaluation = _stage_config(
        EvalConfig, config["eval"] or {},
        {**common, "data": config["gsm8k"], "compressor": str(compressor_dir), "classifier": classifier.out}, "eval", path,
    )

    started = time.perf_counter()
    if (compressor_dir / "dyncomp_compressor.json").is_file():
        logger.info("compressor: %s exists, skipping training", compressor_dir)
    else:
        logger.info("compressor: training into %s", compressor_dir)
        train_compressor(compressor)

    if (Path(classifier.out) / "classifier.json").is_file():
        logger.info("classifier: %s exists, skipping training", classifier.out)
    else:
        logger.info("classifier: training into %s", classifier.out)
        train_classifier(classifier)

    results = run_eval(evaluation)
    logger.info("pipeline finished in %.0f s; report in %s", time.perf_counter() - started, Path(evaluation.out) / "report.md")
    return results
