"""`classifier:τ`: compress where the trained probe gives the next token a `<COMP>` probability of at least τ."""

from __future__ import annotations

from pathlib import Path

import torch

from dyncomp.errors import UserError
from dyncomp.policies.base import DecodeState, Policy


class ClassifierPolicy(Policy):
    """Score the final-norm hidden state of every row with the probe, in one call for the whole batch.

    `classifier` is a `TrainedClassifier` or the folder of one. Without an argument, τ is the
    value chosen on validation data when the classifier was trained. The policy has no access to
    the model, so the caller checks the pair with `TrainedClassifier.check_model` and `check_compressor`.
    """

    name = "classifier"
    needs_hidden = True

    def __init__(self, argument: str | None = None, min_step_tokens: int = 8, classifier=None):
        super().__init__(min_step_tokens)
        if classifier is None:
            raise UserError("method 'classifier' needs a trained classifier; pass --classifier DIR (the folder train-classifier wrote)")
        if isinstance(classifier, (str, Path)):
            from dyncomp.classifier.probe import load_classifier

            classifier = load_classifier(classifier)
        self.classifier = classifier
        self.tau = classifier.info.tau if argument is None else parse_tau(argument)

    def prepare(self, tokenizer, device: torch.device | str = "cpu") -> None:
        self.classifier.probe.to(device)

    def decide(self, state: DecodeState) -> torch.Tensor:
        if state.hidden is None:
            raise ValueError("the classifier policy needs DecodeState.hidden; the engine must capture it when policy.needs_hidden is True")
        probe = self.classifier.probe
        expected = probe.config.input_size
        if state.hidden.shape[-1] != expected:
            raise UserError(
                f"classifier {self.classifier.path} reads hidden size {expected}, but the model's hidden states have size "
                f"{state.hidden.shape[-1]}; pass a classifier trained on this model"
            )
        if probe.feature_mean.device != state.hidden.device:
            probe.to(state.hidden.device)
        return probe.probability(state.hidden) >= self.tau  # (batch,)

    def spec(self) -> str:
        return f"classifier:{self.tau:g}"


def parse_tau(argument: str) -> float:
    try:
        tau = float(argument)
    except ValueError:
        tau = float("nan")
    if not 0.0 < tau < 1.0:
        raise UserError(f"invalid method 'classifier:{argument}'; give a threshold between 0 and 1, e.g. classifier:0.9")
    return tau
