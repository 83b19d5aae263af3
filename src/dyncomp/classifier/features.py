"""Hidden-state features and `<COMP>` labels for the probe, computed once and cached on disk.

A feature is the output of the model's final norm at one reasoning token, and its label is
1 when the annotation puts a `<COMP>` right after that token. Prompt tokens, `<COMP>` tokens
and the closing end-of-turn token get no feature, because the classifier never decides there
during generation.

Two feature modes exist. `compressed` runs the model under the compression mask with `<COMP>`
groups at the annotated boundaries, which is what the classifier receives while generating with
compression. `uncompressed` runs the plain text with an ordinary causal mask, as the reference
implementation did. Both modes use the same traces and label the same reasoning tokens, so their
scores compare directly.

Features are cached as fp16 safetensors under a key that hashes the base model, the compressor
weights, the examples and every setting that changes a feature, so a stale cache is never reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from dyncomp.classifier.probe import FEATURE_MODES, LAYER
from dyncomp.data.annotated import AnnotatedExample
from dyncomp.errors import UserError
from dyncomp.models.compressed import CompressedModel
from dyncomp.models.loading import cache_dir
from dyncomp.models.tokens import base_fingerprint, unwrap_peft
from dyncomp.prompting import format_prompt
from dyncomp.compression.recurrent import compressed_forward
from dyncomp.training.encoding import IGNORE_INDEX, EncodedSequence, Reasoning, insert_comp, pad_batch, tokenize_reasoning

logger = logging.getLogger(__name__)

FEATURE_FORMAT_VERSION = 1
"""Version of the extraction code, part of every cache key. Raise it when extraction changes what a cached feature means."""

_FINAL_NORM_NAMES = ("norm", "final_layernorm", "ln_f", "final_norm")
_FP16_MAX = float(torch.finfo(torch.float16).max)


def find_final_norm(model: nn.Module) -> nn.Module:
    """Return the norm module applied after the last decoder layer of `model` (a PEFT model or a plain one)."""
    base = unwrap_peft(model)
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else base
    for name in _FINAL_NORM_NAMES:
        module = getattr(decoder, name, None)
        if isinstance(module, nn.Module):
            return module

    # Some layouts nest the decoder once more. The last matching module is then the one after the layers.
    matches = [module for name, module in decoder.named_modules() if name.rsplit(".", 1)[-1] in _FINAL_NORM_NAMES]
    if matches:
        return matches[-1]
    raise UserError(
        f"{type(base).__name__} has no final norm module named {', '.join(_FINAL_NORM_NAMES)}; "
        "the <COMP> classifier supports decoder models with a final norm, such as Llama, Qwen2, Mistral and Gemma"
    )


class FinalNormCapture:
    """Keep the output of the model's final norm from each forward call, for as long as the `with` block lasts.

    `output` is the latest call's hidden states `(batch, seq, hidden)`, detached, and None again
    after the block. During decoding,
    `output[:, -1]` is the state of the token just fed, read from the forward pass that also
    makes the next token's logits, so the classifier costs no extra pass and no layer stack.
    """

    def __init__(self, model: nn.Module):
        self.module = find_final_norm(model)
        self.output: torch.Tensor | None = None
        self._handle = None

    def _store(self, module, args, output) -> None:
        self.output = (output[0] if isinstance(output, tuple) else output).detach()

    def __enter__(self) -> "FinalNormCapture":
        self._handle = self.module.register_forward_hook(self._store)
        return self

    def __exit__(self, *exc_info) -> None:
        try:
            self._handle.remove()
        finally:
            self._handle = None
            self.output = None


def reasoning_labels(reasoning: Reasoning, eos_token_id: int | None) -> list[bool]:
    """Label each scored reasoning token: True when the annotation puts `<COMP>` right after it.

    The list covers `reasoning.reasoning_ids` except a closing end-of-turn token, so its
    length is the number of features of the trace. A boundary on the last token is ignored,
    as `insert_comp` ignores it.
    """
    count = len(reasoning.reasoning_ids)
    if count and eos_token_id is not None and reasoning.reasoning_ids[-1] == eos_token_id:
        count -= 1
    boundaries = {index for index in reasoning.oracle_boundaries if index < len(reasoning.reasoning_ids) - 1}
    return [index in boundaries for index in range(count)]


def reasoning_positions(sequence: EncodedSequence, count: int) -> list[int]:
    """Return the indices in `sequence.input_ids` of its first `count` reasoning tokens.

    Reasoning tokens are the labelled ones, so prompt and `<COMP>` tokens are skipped.
    """
    positions = [index for index, label in enumerate(sequence.labels) if label != IGNORE_INDEX]
    assert len(positions) >= count, f"sequence {sequence.id} has {len(positions)} reasoning tokens, expected at least {count}"
    return positions[:count]


@dataclass
class FeatureSet:
    """Features and labels of the scored reasoning tokens of several traces, in trace order."""

    features: torch.Tensor
    """(positions, hidden) fp16 final-norm hidden states."""
    labels: torch.Tensor
    """(positions,) bool, True where `<COMP>` follows in the annotation."""
    sample_index: torch.Tensor
    """(positions,) int64 index into `ids` of the trace each position belongs to."""
    ids: list[str]
    left_out_ids: list[str]
    """Traces longer than the length limit, which have no features."""
    key: str
    """The cache key these features were stored under."""

    @property
    def num_samples(self) -> int:
        return len(self.ids)

    def gold_markers(self) -> torch.Tensor:
        """Return the annotated `<COMP>` count of each trace, shape (samples,)."""
        return torch.bincount(self.sample_index, weights=self.labels.double(), minlength=self.num_samples).long()


def compressor_fingerprint(compressor: str | Path | None) -> dict | None:
    """Return `{"path", "sha256"}` of a compressor folder, None for no compressor (an untrained adapter).

    The hash covers the adapter weights files and the compressor's metadata, which contains the
    settings (k, mode, keep_prompt) that change the hidden states.
    """
    if compressor is None:
        return None
    from dyncomp.compression.lora import METADATA_FILE

    folder = Path(compressor).expanduser().resolve()
    files = sorted(folder.glob("*/adapter_model.safetensors")) + [folder / METADATA_FILE]
    missing = [str(path) for path in files if not path.is_file()]
    if missing or len(files) < 2:
        raise UserError(f"compressor folder {folder} has no adapter weights or metadata ({', '.join(missing) or 'no */adapter_model.safetensors'}); pass the folder that train-compressor wrote")
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(folder).as_posix().encode())
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return {"path": str(folder), "sha256": digest.hexdigest()}


def model_source_record(source: str) -> str:
    """Return `source` as an absolute path when it names an existing file or folder, else unchanged (a Hub id or packaged name)."""
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source


def default_feature_cache() -> Path:
    return cache_dir() / "classifier-features"


def _examples_digest(examples: list[AnnotatedExample]) -> str:
    digest = hashlib.sha256()
    for example in examples:
        digest.update(json.dumps([example.id, example.question, example.reasoning]).encode())
    return digest.hexdigest()


def feature_key(loaded: CompressedModel, compressor: str | Path | None, examples: list[AnnotatedExample], mode: str, max_length: int) -> tuple[str, dict]:
    """Return the cache key of a feature set and the fields it hashes."""
    model = loaded.model
    fields = {
        "format": FEATURE_FORMAT_VERSION,
        "layer": LAYER,
        "model": model_source_record(loaded.source),
        "base_fingerprint": base_fingerprint(model),
        "compressor": (compressor_fingerprint(compressor) or {}).get("sha256", "untrained"),
        "compressor_config": loaded.config.to_dict(),
        "comp_ids": list(loaded.comp.ids),
        "tokenizer_size": len(loaded.tokenizer),
        "prompt": hashlib.sha256(format_prompt(loaded.tokenizer, "{question}").encode()).hexdigest(),
        "examples": _examples_digest(examples),
        "mode": mode,
        "max_length": max_length,
        "dtype": str(next(model.parameters()).dtype),
    }
    key = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:24]
    return f"{mode}-{key}", fields


def load_or_extract_features(
    loaded: CompressedModel,
    examples: list[AnnotatedExample],
    *,
    compressor: str | Path | None,
    mode: str = "compressed",
    max_length: int = 768,
    batch_size: int = 4,
    cache: str | Path | None = None,
    description: str = "features",
) -> FeatureSet:
    """Return the features of `examples`, from the cache when it contains them, else computed and stored.

    `compressor` is the folder `loaded` was built from, or None for an untrained adapter. Only
    its hash enters the key. `cache` defaults to `default_feature_cache()`.
    """
    if mode not in FEATURE_MODES:
        raise UserError(f"unknown feature mode '{mode}'; use one of {', '.join(FEATURE_MODES)}")
    if max_length < 2:
        raise UserError(f"--max-length must be at least 2 tokens, got {max_length}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")

    key, fields = feature_key(loaded, compressor, examples, mode, max_length)
    folder = Path(cache).expanduser() if cache is not None else default_feature_cache()
    path = folder / f"{key}.safetensors"
    if path.is_file():
        logger.info("%s: reusing cached features %s", description, path)
        return _read_features(path, key)

    logger.info("%s: computing %s features of %d traces (cache %s)", description, mode, len(examples), path)
    features = extract_features(loaded, examples, mode=mode, max_length=max_length, batch_size=batch_size, description=description)
    features.key = key
    _write_features(path, features, fields)
    return features


@torch.inference_mode()
def extract_features(
    loaded: CompressedModel,
    examples: list[AnnotatedExample],
    *,
    mode: str = "compressed",
    max_length: int = 768,
    batch_size: int = 4,
    description: str = "features",
) -> FeatureSet:
    """Run the frozen model over the traces and collect final-norm features and labels, without caching.

    A trace whose sequence with `<COMP>` groups exceeds `max_length` is left out in both modes,
    so the two modes cover the same traces.
    """
    model, tokenizer, comp = loaded.model, loaded.tokenizer, loaded.comp
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id

    kept_ids, left_out, sequences, labels = [], [], [], []
    for example in examples:
        reasoning = tokenize_reasoning(tokenizer, example.id, example.question, example.steps())
        compressed = insert_comp(reasoning, reasoning.oracle_boundaries, comp)
        if len(compressed.input_ids) > max_length:
            left_out.append(example.id)
            continue
        kept_ids.append(example.id)
        sequences.append(compressed if mode == "compressed" else insert_comp(reasoning, [], None))
        labels.append(reasoning_labels(reasoning, eos))
    if left_out:
        logger.warning("%s: %d of %d traces exceed --max-length %d tokens and are left out", description, len(left_out), len(examples), max_length)
    if not sequences:
        raise UserError(f"no trace fits in --max-length {max_length} tokens; raise it")

    # Similar lengths share a batch, so little compute goes to padding.
    order = sorted(range(len(sequences)), key=lambda index: len(sequences[index].input_ids))
    per_trace: list[torch.Tensor | None] = [None] * len(sequences)
    starts = range(0, len(order), batch_size)
    with FinalNormCapture(model) as capture:
        for start in tqdm(starts, desc=description, unit="batch", leave=False):
            chunk = order[start : start + batch_size]
            batch = {name: tensor.to(device) for name, tensor in pad_batch([sequences[i] for i in chunk], tokenizer.pad_token_id, side="right").items()}
            # logits_to_keep=1 skips the vocabulary projection of every position but one, since only hidden states are read.
            if mode == "compressed":
                compressed_forward(model, batch, comp.ids, loaded.config.mode, loaded.config.keep_prompt, logits_to_keep=1)
            else:
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False, logits_to_keep=1)
            hidden = capture.output  # (batch, seq, hidden)
            for row, index in enumerate(chunk):
                positions = torch.tensor(reasoning_positions(sequences[index], len(labels[index])), device=hidden.device)
                # Final-norm outputs stay far below the fp16 maximum in practice; the clamp keeps an outlier finite.
                per_trace[index] = hidden[row, positions].float().clamp(-_FP16_MAX, _FP16_MAX).to("cpu", torch.float16)  # (tokens, hidden)

    features = torch.cat(per_trace)  # (positions, hidden)
    label_tensor = torch.tensor([value for trace in labels for value in trace], dtype=torch.bool)
    sample_index = torch.cat([torch.full((len(trace),), index, dtype=torch.long) for index, trace in enumerate(labels)])
    return FeatureSet(features, label_tensor, sample_index, kept_ids, left_out, key="")


def _write_features(path: Path, features: FeatureSet, fields: dict) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        "features": features.features.contiguous(),
        "labels": features.labels.to(torch.uint8),
        "sample_index": features.sample_index.to(torch.int32),
    }
    metadata = {"ids": json.dumps(features.ids), "left_out_ids": json.dumps(features.left_out_ids), "fields": json.dumps(fields, sort_keys=True)}
    # A temporary name and a rename keep a crash from leaving a truncated file under the final key.
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(handle)
    try:
        save_file(tensors, temporary, metadata=metadata)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    logger.info("cached %d features of %d traces in %s", len(features.labels), len(features.ids), path)


def _read_features(path: Path, key: str) -> FeatureSet:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in ("features", "labels", "sample_index")}
        ids = json.loads(metadata["ids"])
        left_out = json.loads(metadata["left_out_ids"])
    except (SafetensorError, KeyError, json.JSONDecodeError, OSError) as error:
        raise UserError(f"feature cache {path} is unreadable ({error}); delete it and rerun") from error
    return FeatureSet(
        features=tensors["features"],
        labels=tensors["labels"].bool(),
        sample_index=tensors["sample_index"].long(),
        ids=ids,
        left_out_ids=left_out,
        key=key,
    )
