"""The `<COMP>`-position probe and its saved form.

A probe maps the last layer's hidden state of a token, read at the model's final norm, to
the logit of "the next token should be `<COMP>`". A classifier folder contains the weights
(`probe.safetensors`) and a JSON record (`classifier.json`) of everything needed to use them
again: the probe shape, the base model it was trained on, the compressor its features came
from, the feature mode and the chosen threshold τ.
"""

from __future__ import annotations

import json
import os
import logging
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

from dyncomp.errors import UserError
from dyncomp.models.tokens import check_token_record

logger = logging.getLogger(__name__)

PROBE_KINDS = ("mlp", "linear")
FEATURE_MODES = ("compressed", "uncompressed")
WEIGHTS_FILE = "probe.safetensors"
CONFIG_FILE = "classifier.json"
FORMAT_VERSION = 1
LAYER = "final_norm"
"""The module whose output is the feature: the model's final norm, after the last decoder layer."""


@dataclass
class ProbeConfig:
    """The shape of a probe."""

    input_size: int
    """Hidden size of the model whose states the probe reads."""
    kind: str = "mlp"
    """'mlp' (input -> hidden -> 1) or 'linear' (input -> 1)."""
    hidden: int | None = None
    """Width of the MLP's hidden layer, or None for the input size. A linear probe ignores it."""
    dropout: float = 0.1

    def validate(self) -> None:
        if self.kind not in PROBE_KINDS:
            raise UserError(f"unknown probe kind '{self.kind}'; use one of {', '.join(PROBE_KINDS)}")
        if self.input_size < 1:
            raise UserError(f"probe input size must be at least 1, got {self.input_size}")
        if self.hidden is not None and self.hidden < 1:
            raise UserError(f"--hidden must be at least 1, got {self.hidden}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"probe dropout must be in [0, 1), got {self.dropout}")

    @property
    def width(self) -> int:
        return self.hidden or self.input_size


class Probe(nn.Module):
    """A small MLP or linear head that scores hidden states, with the training features' mean and std built in.

    Standardizing inside the module means callers pass raw hidden states, in any float
    dtype, and the saved weights carry the statistics they were trained with.
    """

    def __init__(self, config: ProbeConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.register_buffer("feature_mean", torch.zeros(config.input_size))
        self.register_buffer("feature_std", torch.ones(config.input_size))
        if config.kind == "linear":
            self.head = nn.Sequential(nn.Linear(config.input_size, 1))
        else:
            self.head = nn.Sequential(
                nn.Linear(config.input_size, config.width),
                nn.GELU(),
                nn.Dropout(config.dropout),
                nn.Linear(config.width, 1),
            )

    def set_normalization(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        # A constant feature has std 0, and dividing it by 1 instead leaves it at 0 after centring.
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Return logits `(...,)` for hidden states `(..., input_size)`."""
        standardized = (hidden.to(self.feature_mean.dtype) - self.feature_mean) / self.feature_std
        return self.head(standardized).squeeze(-1)

    @torch.no_grad()
    def probability(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.forward(hidden))


@dataclass
class ClassifierInfo:
    """The JSON record saved beside the probe weights."""

    probe: ProbeConfig
    record: dict
    """`token_record` of the base model: source, fingerprint, `<COMP>` tokens, tokenizer size."""
    compressor: dict | None
    """`{"path", "sha256"}` of the compressor the features came from, or None for an untrained adapter."""
    feature_mode: str
    tau: float
    tau_rule: str
    num_hidden_layers: int
    max_length: int
    """Maximum sequence length in tokens, `<COMP>` tokens included, that feature extraction kept."""
    dtype: str
    """Model weights dtype the features were computed in, e.g. 'torch.float32'."""
    layer: str = LAYER
    training: dict = field(default_factory=dict)
    """Data file, trace counts and validation scores, for the record."""

    @property
    def base_model(self) -> str:
        return self.record["base_model"]

    def to_dict(self) -> dict:
        data = asdict(self)
        data["format_version"] = FORMAT_VERSION
        return data

    @classmethod
    def from_dict(cls, data: dict, where: Path) -> "ClassifierInfo":
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise UserError(f"{where} has format version {version}, this dyncomp reads version {FORMAT_VERSION}; retrain the classifier")
        values = {key: value for key, value in data.items() if key != "format_version"}
        known = {f.name for f in fields(cls)}
        missing = sorted(name for name in ("probe", "record", "feature_mode", "tau") if name not in values)
        unknown = sorted(set(values) - known)
        if missing or unknown:
            raise UserError(f"{where} is not a valid classifier record (missing {missing}, unknown {unknown}); retrain the classifier")
        try:
            values["probe"] = ProbeConfig(**values["probe"])
            return cls(**values)
        except TypeError as error:
            raise UserError(f"{where} is not a valid classifier record ({error}); retrain the classifier") from error


@dataclass
class TrainedClassifier:
    """A loaded probe, its record and the folder it came from."""

    probe: Probe
    info: ClassifierInfo
    path: Path

    def check_model(self, model: nn.Module, tokenizer, comp, source: str) -> None:
        """Raise `UserError` unless `model` is the base model, with the same `<COMP>` tokens, that the probe was trained on."""
        check_token_record(self.info.record, model, tokenizer, comp, source, what=f"classifier {self.path}")

    def check_compressor(self, compressor: str | Path | None) -> None:
        """Raise `UserError` when `compressor` is not the compressor the features were computed with.

        A different adapter writes different `<COMP>` keys and values, so the hidden states the
        probe receives while generating would differ from those it was trained on.
        """
        from dyncomp.classifier.features import compressor_fingerprint

        expected = self.info.compressor
        actual = compressor_fingerprint(compressor)
        if (expected or {}).get("sha256") == (actual or {}).get("sha256"):
            return
        # The record's path is relative to the classifier folder (absolute in older records).
        trained_with = str((Path(self.path) / expected["path"]).resolve()) if expected else "an untrained adapter"
        given = actual["path"] if actual else "an untrained adapter"
        if expected and actual and Path(trained_with) == Path(actual["path"]):
            raise UserError(
                f"compressor {given} changed since classifier {self.path} was trained on its features; "
                "retrain the classifier with this compressor"
            )
        raise UserError(
            f"classifier {self.path} was trained on features of compressor {trained_with}, not {given}; "
            f"pass --compressor {trained_with if expected else '(none)'} or retrain the classifier"
        )


def save_classifier(out: str | Path, probe: Probe, info: ClassifierInfo) -> Path:
    """Write `probe.safetensors` and `classifier.json` into `out` and return the folder."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in probe.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE))
    record = info.to_dict()
    if record.get("compressor"):
        # A path relative to the classifier keeps a committed pair of folders usable from any clone.
        record["compressor"]["path"] = os.path.relpath(record["compressor"]["path"], out.resolve())
    (out / CONFIG_FILE).write_text(json.dumps(record, indent=2) + "\n")
    logger.info("saved classifier (%s probe, tau %.2f) to %s", info.probe.kind, info.tau, out)
    return out


def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> TrainedClassifier:
    """Load a classifier folder written by `save_classifier`, in eval mode on `device`.

    Raises `UserError` when the folder, its record or its weights are missing or do not fit together.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_dir():
        raise UserError(f"classifier folder not found: {path}; pass the folder that train-classifier wrote")
    config_path = path / CONFIG_FILE
    weights_path = path / WEIGHTS_FILE
    for required in (config_path, weights_path):
        if not required.is_file():
            raise UserError(f"{path} has no {required.name}, so it is not a dyncomp classifier; pass the folder that train-classifier wrote")
    try:
        data = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"{config_path} is not valid JSON ({error}); retrain the classifier or restore the file") from error
    info = ClassifierInfo.from_dict(data, config_path)

    probe = Probe(info.probe)
    try:
        state = load_file(str(weights_path))
        probe.load_state_dict(state)
    except (SafetensorError, RuntimeError) as error:
        # load_state_dict lists the mismatched tensors on the lines after its first.
        detail = " ".join(str(error).split())[:300]
        raise UserError(f"{weights_path} does not match {config_path} ({detail}); retrain the classifier") from error
    probe.to(device)
    probe.eval()
    return TrainedClassifier(probe=probe, info=info, path=path)
