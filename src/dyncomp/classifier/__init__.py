"""The `<COMP>`-position classifier: a probe on the last layer's hidden state that predicts "the next token should be `<COMP>`".

`features` computes and caches the hidden states and labels, `probe` defines the model and its
saved form, and `train` trains it, sweeps τ and evaluates a saved classifier.
"""

from dyncomp.classifier.features import (
    FeatureSet,
    FinalNormCapture,
    compressor_fingerprint,
    extract_features,
    find_final_norm,
    load_or_extract_features,
    reasoning_labels,
    reasoning_positions,
)
from dyncomp.classifier.probe import (
    ClassifierInfo,
    Probe,
    ProbeConfig,
    TrainedClassifier,
    load_classifier,
    save_classifier,
)
from dyncomp.classifier.train import (
    THRESHOLDS,
    EvalClassifierConfig,
    TrainClassifierConfig,
    choose_tau,
    evaluate_classifier,
    score_predictions,
    train_classifier,
    train_probe,
)

__all__ = [
    "THRESHOLDS",
    "ClassifierInfo",
    "EvalClassifierConfig",
    "FeatureSet",
    "FinalNormCapture",
    "Probe",
    "ProbeConfig",
    "TrainClassifierConfig",
    "TrainedClassifier",
    "choose_tau",
    "compressor_fingerprint",
    "evaluate_classifier",
    "extract_features",
    "find_final_norm",
    "load_classifier",
    "load_or_extract_features",
    "reasoning_labels",
    "reasoning_positions",
    "save_classifier",
    "score_predictions",
    "train_classifier",
    "train_probe",
]
