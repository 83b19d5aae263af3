"""Load a base model together with its compressor (trained, or freshly initialised)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dyncomp.models.loading import DEFAULT_MODEL, load_model
from dyncomp.models.tokens import CompTokens, register_comp_tokens


@dataclass
class CompressedModel:
    """A model with `<COMP>` tokens registered and the conditional LoRA attached."""

    model: torch.nn.Module
    tokenizer: object
    comp: CompTokens
    config: object
    """The `CompressorConfig` the adapter was trained with (k, mode, keep_prompt, LoRA sizes)."""
    source: str
    trained: bool


def load_compressed_model(
    source: str = DEFAULT_MODEL,
    compressor: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    k: int = 1,
) -> CompressedModel:
    """Load `source` and the compressor in folder `compressor`.

    With no folder, an untrained adapter is attached: its LoRA update is zero and each
    `<COMP>` embedding is the mean input embedding, the starting point training improves on.
    """
    import json
    from pathlib import Path

    from dyncomp.compression.lora import CompressorConfig, attach_conditional_lora, load_compressor

    loaded = load_model(source, device=device, dtype=dtype)
    model, tokenizer = loaded.model, loaded.tokenizer
    if compressor is None:
        comp = register_comp_tokens(model, tokenizer, k)
        config = CompressorConfig(k=k)
        peft_model = attach_conditional_lora(model, comp, config)
    else:
        metadata = Path(compressor) / "dyncomp_compressor.json"
        saved_k = k
        if metadata.is_file():
            saved_k = len(json.loads(metadata.read_text())["record"]["comp_tokens"]["ids"])
        comp = register_comp_tokens(model, tokenizer, saved_k)
        peft_model, config = load_compressor(model, tokenizer, comp, source, compressor)
    peft_model.eval()
    merge_comp_embeddings(peft_model)
    return CompressedModel(peft_model, tokenizer, comp, config, source, trained=compressor is not None)


def merge_comp_embeddings(peft_model) -> None:
    """Write the trained `<COMP>` rows into the embedding weights, for inference.

    Unmerged, PEFT's trainable-tokens layer rebuilds the whole embedding matrix with
    `index_copy` at every forward pass (and the tied output head a second time), which costs more
    than a decoding step's attention on CPU. PEFT unmerges them again by itself inside
    `disable_adapter()`, so comparisons against the base model stay exact.
    """
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    for module in peft_model.modules():
        if isinstance(module, TrainableTokensLayer) and not module.merged:
            module.merge()
