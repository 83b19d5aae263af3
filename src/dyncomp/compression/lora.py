"""The conditional LoRA: a LoRA adapter whose update applies only to `<COMP>` tokens.

The adapter is an ordinary PEFT LoRA named "comp" on the attention projections, plus trainable
embedding rows for the `<COMP>` ids (PEFT's `trainable_token_indices`). A `CompGate` makes it
conditional: a forward pre-hook on the input embedding module reads the token ids and stores a
gate `(batch, seq, 1)` that is true on `<COMP>` tokens, and a forward hook on every "comp" `lora_B`
module zeroes the LoRA output on the other rows. Rows without a `<COMP>` therefore get exactly
the base model's activations, and the keys and values a `<COMP>` writes are the only ones the
adapter changes. The gate follows the shape of each call's `input_ids`, so it works unchanged
for a full sequence, a prefill and one-token decoding steps with a cache.

Without gradients (generation), a step that holds a `<COMP>` does not run PEFT's LoRA on every
row and zero most of it: hooks on the LoRA layers add the low-rank update to the `<COMP>` rows
only. The result is the same up to rounding. On SmolLM2-135M at batch 8 (2 CPU cores), a
decoding step holding a `<COMP>` took 68 ms this way and 71 ms through PEFT. One without took 60 ms.

PEFT initialises `lora_B` to zero, so an untrained adapter computes the base model's function
except for the `<COMP>` embedding rows.

NOTE: when the base model ties its input and output embeddings (SmolLM2 does), PEFT ties the
output rows of the `<COMP>` ids to the trained input rows. Then the logits of the `<COMP>` ids
change on every row, even with no `<COMP>` in the input, while all other logits stay exact.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from dyncomp.compression.masks import MODES
from dyncomp.errors import UserError
from dyncomp.models.tokens import CompTokens, check_token_record

logger = logging.getLogger(__name__)

ADAPTER = "comp"
METADATA_FILE = "dyncomp_compressor.json"
FORMAT_VERSION = 1


@dataclass
class CompressorConfig:
    """Settings of a compressor: the `<COMP>` group, the cache policy and the LoRA shape."""

    k: int = 1
    """Number of `<COMP>` tokens per group, so memory grows by k slots per compression."""
    mode: str = "concat"
    keep_prompt: bool = True
    """False drops the prompt except its first token at the first compression, as the reference implementation does."""
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    """Names of the linear modules that get LoRA weights."""
    task_lora: bool = False
    """An ungated LoRA on every token besides the gated one, for base models that first have to learn the task; not supported yet."""

    def validate(self) -> None:
        if self.k < 1:
            raise UserError(f"k must be at least 1, got {self.k}")
        if self.mode not in MODES:
            raise UserError(f"unknown compression mode '{self.mode}'; use one of {', '.join(MODES)}")
        if self.mode != "concat":
            raise UserError(f"compression mode '{self.mode}' is not supported yet; use mode 'concat'")
        if self.rank < 1:
            raise UserError(f"LoRA rank must be at least 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise UserError("targets is empty; name at least one linear module, e.g. q_proj")
        if self.task_lora:
            # NOTE: an ungated "task" adapter active beside "comp" runs, because PEFT's tuner
            # set_adapter takes a list of names. PEFT 0.21.2 cannot save or load it, because its
            # TrainableTokensWrapper raises KeyError for an adapter without trainable embedding rows.
            raise UserError(
                "task_lora is not supported yet, because PEFT cannot save a second LoRA next to trainable <COMP> rows; "
                "train a task LoRA first, merge it into the base model (merge_and_unload) and train the compressor on that"
            )

    def to_dict(self) -> dict:
        data = asdict(self)
        data["targets"] = list(self.targets)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "CompressorConfig":
        known = {field.name for field in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"unknown compressor settings {unknown}; known settings are {sorted(known)}")
        values = dict(data)
        if "targets" in values:
            values["targets"] = tuple(values["targets"])
        return cls(**values)


def embedding_module_name(model: torch.nn.Module) -> str:
    """Return the qualified name of the model's input embedding module, such as `model.embed_tokens`."""
    embeddings = model.get_input_embeddings()
    for name, module in model.named_modules():
        if module is embeddings:
            return name
    raise UserError(f"{type(model).__name__} has no input embedding module among its submodules; it cannot take <COMP> tokens")


class CompGate:
    """The hooks that restrict the "comp" LoRA update to `<COMP>` rows, removable with `remove()` or a `with` block.

    The gate comes from a forward pre-hook on the input embedding module rather than on the
    model, so every call that embeds token ids sets it, whichever wrapper of the model was
    called. The gate of the latest call is kept after the call returns, because gradient
    checkpointing runs the layers again during the backward pass and their `lora_B` hooks need
    the same gate then. Removing the hooks turns the adapter into an ordinary LoRA on every token.
    """

    def __init__(self, peft_model, comp_ids: Sequence[int], adapter: str = ADAPTER):
        from peft.tuners.lora import LoraLayer
        from peft.tuners.lora import Linear as LoraLinear

        self.comp_ids = tuple(int(i) for i in comp_ids)
        self.adapter = adapter
        self._gate: torch.Tensor | None = None
        self._paused: list = []
        self._row_hooks: list = []

        self._lora_layers = [module for module in peft_model.modules() if isinstance(module, LoraLayer) and adapter in module.lora_B]
        # Plain LoRA linears only: a variant (DoRA and others) computes its update differently.
        self._rows_only = all(type(layer) is LoraLinear and adapter not in layer.lora_variant for layer in self._lora_layers)
        lora_b_modules = [module.lora_B[adapter] for module in self._lora_layers]
        if not lora_b_modules:
            raise UserError(f"the model has no LoRA modules of adapter '{adapter}'; check the LoRA targets")
        self._handles = [
            peft_model.get_base_model().register_forward_pre_hook(self._reject_embeddings_only, with_kwargs=True),
            peft_model.get_input_embeddings().register_forward_pre_hook(self._store_gate),
            peft_model.get_base_model().register_forward_hook(self._resume_layers, always_call=True),
        ]
        self._handles += [module.register_forward_hook(self._apply_gate) for module in lora_b_modules]
        logger.debug("gated %d lora_B modules of adapter '%s'", len(lora_b_modules), adapter)

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def _reject_embeddings_only(self, module, args, kwargs):
        if kwargs.get("input_ids") is None and not args and kwargs.get("inputs_embeds") is not None:
            raise ValueError("the conditional LoRA finds <COMP> rows from input_ids; call the model with input_ids, not inputs_embeds")

    def _store_gate(self, module, args):
        input_ids = args[0]
        comp_table = torch.as_tensor(self.comp_ids, device=input_ids.device)
        self._gate = torch.isin(input_ids, comp_table).unsqueeze(-1)  # (batch, seq, 1)

        # Most decoding steps hold no <COMP> at all, and there the gated update is zero anyway, so
        # the LoRA layers are switched off for the call instead of computing it. On the other
        # steps the update is added to the <COMP> rows only. Layers a user disabled (PEFT's
        # disable_adapter) are left alone, and training always takes the full path.
        self._resume_layers()
        if torch.is_grad_enabled():
            return
        comp_rows = self._gate.flatten().nonzero().flatten()  # indices into (batch * seq)
        if comp_rows.numel() and not (self._rows_only and self._dropout_off(module)):
            return
        self._paused = [layer for layer in self._lora_layers if not layer._disable_adapters and self.adapter in layer.active_adapters]
        for layer in self._paused:
            layer._disable_adapters = True
        if comp_rows.numel():
            self._row_hooks = [layer.register_forward_hook(self._rows_update(comp_rows)) for layer in self._paused]

    def _dropout_off(self, module) -> bool:
        return not module.training or all(isinstance(layer.lora_dropout[self.adapter], torch.nn.Identity) for layer in self._lora_layers)

    def _rows_update(self, comp_rows: torch.Tensor):
        adapter = self.adapter

        def add_update(layer, args, output):
            x = args[0]
            # Weights rather than module calls: the lora_B gate hook expects whole-batch outputs.
            lora_a, lora_b = layer.lora_A[adapter], layer.lora_B[adapter]
            picked = x.reshape(-1, x.shape[-1]).index_select(0, comp_rows)  # (comp rows, in)
            if picked.dtype != lora_a.weight.dtype:
                picked = picked.to(lora_a.weight.dtype)
            update = F.linear(F.linear(picked, lora_a.weight, lora_a.bias), lora_b.weight, lora_b.bias)  # (comp rows, out)
            if update.dtype != output.dtype:
                update = update.to(output.dtype)
            # The base layer's output is a fresh tensor, so it takes the update in place.
            output.view(-1, output.shape[-1]).index_add_(0, comp_rows, update, alpha=layer.scaling[adapter])
            return output

        return add_update

    def _resume_layers(self, *hook_args) -> None:
        for handle in self._row_hooks:
            handle.remove()
        self._row_hooks = []
        for layer in self._paused:
            layer._disable_adapters = False
        self._paused = []

    def _apply_gate(self, module, args, output):
        gate = self._gate
        if gate is None or gate.shape[:-1] != output.shape[:-1]:
            shape = None if gate is None else tuple(gate.shape[:-1])
            raise RuntimeError(
                f"the <COMP> gate {shape} does not match the LoRA output {tuple(output.shape[:-1])}; "
                "the gated LoRA modules must run inside a forward call of the model with input_ids"
            )
        return output.masked_fill(~gate.to(output.device), 0.0)

    def remove(self) -> None:
        self._resume_layers()
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._gate = None

    def __enter__(self) -> "CompGate":
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()


def comp_gate(peft_model) -> CompGate:
    """Return the `CompGate` that `attach_conditional_lora` or `load_compressor` put on the model."""
    gate = peft_model.__dict__.get("_dyncomp_comp_gate")
    if gate is None:
        raise ValueError("this model has no conditional LoRA gate; build it with attach_conditional_lora or load_compressor")
    return gate


def _lora_config(config: CompressorConfig, trainable_tokens: dict[str, list[int]]):
    from peft import LoraConfig

    return LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=list(config.targets),
        trainable_token_indices=trainable_tokens,
        bias="none",
        task_type="CAUSAL_LM",
    )


def attach_conditional_lora(model: torch.nn.Module, comp: CompTokens, config: CompressorConfig):
    """Wrap `model` (modified in place) in a PEFT model with a gated "comp" LoRA and trainable `<COMP>` embedding rows.

    `comp` must already be registered on the model (`register_comp_tokens`) with `config.k`
    tokens. The returned `peft.PeftModel` keeps its `CompGate`, which `comp_gate` returns.
    """
    from peft import get_peft_model

    config.validate()
    if comp.k != config.k:
        raise UserError(f"the compressor config asks for k={config.k} <COMP> tokens but {comp.k} are registered; register k={config.k} tokens")
    rows = model.get_input_embeddings().weight.shape[0]
    if max(comp.ids) >= rows:
        raise UserError(f"<COMP> id {max(comp.ids)} is outside the embedding of {rows} rows; call register_comp_tokens on this model first")

    trainable_tokens = {embedding_module_name(model): list(comp.ids)}
    peft_model = get_peft_model(model, _lora_config(config, trainable_tokens), adapter_name=ADAPTER)
    peft_model._dyncomp_comp_gate = CompGate(peft_model, comp.ids)
    return peft_model


def save_compressor(peft_model, out_dir: str | Path, record: dict, config: CompressorConfig) -> Path:
    """Write the adapter in PEFT's format to `out_dir/comp` (safetensors) and `dyncomp_compressor.json` to `out_dir`.

    `record` comes from `token_record` and ties the compressor to its base model and tokenizer.
    Only the `<COMP>` embedding rows are stored, not the whole embedding, because
    `register_comp_tokens` rebuilds the other rows from the base model.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # save_embedding_layers=False also skips PEFT's check of the base model's vocabulary size,
    # which looks the model id up on the Hub.
    peft_model.save_pretrained(str(out_dir), selected_adapters=[ADAPTER], save_embedding_layers=False)
    metadata = {"format_version": FORMAT_VERSION, "adapter": ADAPTER, "record": record, "config": config.to_dict()}
    (out_dir / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    logger.info("saved compressor to %s", out_dir)
    return out_dir


def _read_metadata(path: Path) -> dict:
    if not path.is_dir():
        raise UserError(f"compressor folder not found: {path}; pass the folder that train-compressor wrote")
    metadata_path = path / METADATA_FILE
    if not metadata_path.is_file():
        raise UserError(f"{path} has no {METADATA_FILE}, so it is not a dyncomp compressor; pass the folder that train-compressor wrote")
    try:
        metadata = json.loads(metadata_path.read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"{metadata_path} is not valid JSON ({error}); retrain the compressor or restore the file") from error
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        raise UserError(f"{metadata_path} has format version {version}, this dyncomp reads version {FORMAT_VERSION}; retrain the compressor")
    for key in ("record", "config"):
        if key not in metadata:
            raise UserError(f"{metadata_path} has no '{key}' entry; retrain the compressor or restore the file")
    return metadata


def load_compressor(model: torch.nn.Module, tokenizer, comp: CompTokens, source: str, path: str | Path, *, trainable: bool = False):
    """Load a compressor saved by `save_compressor` onto `model` and gate it; returns `(peft.PeftModel, CompressorConfig)`.

    Raises `UserError` when the folder or its metadata is missing or when the compressor was
    made for another base model or tokenizer. `trainable=True` leaves the adapter trainable,
    to continue training.
    """
    from peft import PeftModel

    path = Path(path)
    metadata = _read_metadata(path)
    check_token_record(metadata["record"], model, tokenizer, comp, source, what=f"compressor {path}")
    config = CompressorConfig.from_dict(metadata["config"])
    config.validate()
    if config.k != comp.k:
        raise UserError(f"compressor {path} uses k={config.k} <COMP> tokens but {comp.k} are registered; register k={config.k} tokens")

    adapter_dir = path / ADAPTER
    if not (adapter_dir / "adapter_config.json").is_file():
        raise UserError(f"compressor {path} has no adapter: {adapter_dir / 'adapter_config.json'} is missing; retrain the compressor")

    peft_model = PeftModel.from_pretrained(model, str(adapter_dir), adapter_name=ADAPTER, is_trainable=trainable)
    peft_model._dyncomp_comp_gate = CompGate(peft_model, comp.ids)
    logger.info("loaded compressor %s (k=%d, mode=%s)", path, config.k, config.mode)
    return peft_model, config
