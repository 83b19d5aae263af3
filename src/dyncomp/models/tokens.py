"""Register the `<COMP>` special tokens and fingerprint a base model."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import torch

from dyncomp.errors import UserError

COMP_MARKER = "<COMP>"
"""The marker annotated reasoning uses at a step boundary."""



def unwrap_peft(model: torch.nn.Module) -> torch.nn.Module:
    """Return the `transformers` model inside a PEFT wrapper, or `model` itself when it is not wrapped."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model

@dataclass(frozen=True)
class CompTokens:
    """The k `<COMP>` token strings and ids registered on one tokenizer."""

    strings: tuple[str, ...]
    ids: tuple[int, ...]
    init: str = "mean"
    """Initialisation of the new embedding rows: 'mean' is the mean of the existing input rows."""

    @property
    def k(self) -> int:
        return len(self.ids)

    def to_dict(self) -> dict:
        return {"strings": list(self.strings), "ids": list(self.ids), "init": self.init}

    @classmethod
    def from_dict(cls, data: dict) -> "CompTokens":
        return cls(strings=tuple(data["strings"]), ids=tuple(int(i) for i in data["ids"]), init=data.get("init", "mean"))


def comp_token_strings(k: int) -> tuple[str, ...]:
    if k < 1:
        raise UserError(f"the number of <COMP> tokens must be at least 1, got {k}")
    if k == 1:
        return (COMP_MARKER,)
    return tuple(f"<COMP_{i}>" for i in range(k))


def base_fingerprint(model: torch.nn.Module, vocab_size: int | None = None) -> str:
    """Return a short hash that tells one base model from another.

    It covers the architecture sizes and the sign pattern of the first input embedding rows of
    the original vocabulary, so it survives a change of dtype or device and the growth of
    the embedding by `<COMP>` rows (it reads only the original rows), but not a different checkpoint.
    """
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    embeddings = model.get_input_embeddings().weight
    rows = vocab_size or getattr(model, "_dyncomp_base_vocab", None) or embeddings.shape[0]
    sample = embeddings[: min(rows, 256)].detach().float().cpu()
    # Signs survive a cast to bf16 or fp16, while any two trained checkpoints differ in them.
    signs = hashlib.sha256((sample > 0).numpy().tobytes()).hexdigest()[:16]
    fields = {
        "model_type": text_config.model_type,
        "hidden_size": text_config.hidden_size,
        "layers": text_config.num_hidden_layers,
        "heads": text_config.num_attention_heads,
        "kv_heads": getattr(text_config, "num_key_value_heads", None),
        "vocab": int(rows),
        "embedding_signs": signs,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def register_comp_tokens(model: torch.nn.Module, tokenizer, k: int = 1) -> CompTokens:
    """Add k `<COMP>` special tokens to the tokenizer and grow the embeddings to match.

    New input rows start at the mean of the existing rows, so a `<COMP>` begins as an
    average token rather than noise; with untied output embeddings the new output rows
    start at the mean too. Registering twice with the same k returns the same tokens.
    """
    strings = comp_token_strings(k)
    existing = [tokenizer.convert_tokens_to_ids(s) for s in strings]
    unk = tokenizer.unk_token_id
    if all(i is not None and i != unk for i in existing) and model.get_input_embeddings().weight.shape[0] > max(existing):
        return CompTokens(strings=strings, ids=tuple(existing))

    if not hasattr(model, "_dyncomp_base_vocab"):
        model._dyncomp_base_vocab = model.get_input_embeddings().weight.shape[0]
    old_rows = model.get_input_embeddings().weight.shape[0]
    tokenizer.add_tokens(list(strings), special_tokens=True)
    ids = tuple(tokenizer.convert_tokens_to_ids(s) for s in strings)
    new_rows = max(max(ids) + 1, old_rows)
    if new_rows > old_rows:
        model.resize_token_embeddings(new_rows, mean_resizing=False)

    with torch.no_grad():
        inputs = model.get_input_embeddings().weight
        mean = inputs[:old_rows].mean(dim=0)
        for token_id in ids:
            inputs[token_id] = mean
        outputs = model.get_output_embeddings()
        if outputs is not None and outputs.weight.data_ptr() != inputs.data_ptr():
            out_mean = outputs.weight[:old_rows].mean(dim=0)
            for token_id in ids:
                outputs.weight[token_id] = out_mean
    return CompTokens(strings=strings, ids=ids)


def token_record(model: torch.nn.Module, tokenizer, comp: CompTokens, source: str) -> dict:
    """Describe the base model and `<COMP>` tokens, for artifacts to check they belong to it."""
    return {
        "base_model": source,
        "base_fingerprint": base_fingerprint(model),
        "comp_tokens": comp.to_dict(),
        "tokenizer_size": len(tokenizer),
    }


def check_token_record(record: dict, model: torch.nn.Module, tokenizer, comp: CompTokens, source: str, what: str) -> None:
    """Raise `UserError` when an artifact was made for another base model or tokenizer."""
    fingerprint = base_fingerprint(model)
    if record.get("base_fingerprint") != fingerprint:
        raise UserError(
            f"{what} was made for base model '{record.get('base_model')}' (fingerprint {record.get('base_fingerprint')}), "
            f"but the loaded model is '{source}' (fingerprint {fingerprint}); pass --model {record.get('base_model')} or retrain it"
        )
    saved = CompTokens.from_dict(record["comp_tokens"])
    if saved.strings != comp.strings or saved.ids != comp.ids:
        raise UserError(
            f"{what} uses <COMP> tokens {list(saved.strings)} with ids {list(saved.ids)}, "
            f"but the tokenizer of '{source}' gives ids {list(comp.ids)} for {list(comp.strings)}; retrain it for this tokenizer"
        )
