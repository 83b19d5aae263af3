"""Train the conditional LoRA that writes a finished step into its `<COMP>` keys and values.

Training is one parallel forward pass per batch under the compression mask, which gives the
same logits as online decoding that drops each finished step (tested as invariant 1), so the
loss trains exactly what generation later runs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dyncomp.compression.recurrent import compressed_forward
from dyncomp.data.annotated import AnnotatedExample, load_annotated, split_annotated
from dyncomp.errors import UserError
from dyncomp.models.loading import DEFAULT_MODEL, load_model
from dyncomp.models.tokens import register_comp_tokens, token_record
from dyncomp.training.encoding import IGNORE_INDEX, EncodedSequence, insert_comp, pad_batch, tokenize_reasoning

logger = logging.getLogger(__name__)


@dataclass
class TrainCompressorConfig:
    """Settings of `dyncomp train-compressor`; the CLI takes its defaults from here."""

    data: str = ""
    out: str = ""
    model: str = DEFAULT_MODEL
    k: int = 1
    mode: str = "concat"
    keep_prompt: bool = True
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.0
    task_lora: bool = False
    max_length: int = 768
    epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 4
    grad_accum: int = 1
    learning_rate: float = 1e-3
    warmup: float = 0.05
    eval_steps: int = 50
    save_steps: int = 50
    limit: int | None = None
    seed: int = 0
    report_to: str = "none"
    device: str | None = None
    dtype: str | None = None
    resume: bool = False


def encode_examples(tokenizer, examples: list[AnnotatedExample], comp, max_length: int) -> tuple[list[EncodedSequence], list[str]]:
    """Encode annotated traces with `<COMP>` at the annotated boundaries.

    Returns the sequences that fit in `max_length` and the ids of those that did not, so the
    caller reports them instead of losing them silently.
    """
    kept, too_long = [], []
    for example in examples:
        reasoning = tokenize_reasoning(tokenizer, example.id, example.question, example.steps())
        sequence = insert_comp(reasoning, reasoning.oracle_boundaries, comp)
        if len(sequence.input_ids) > max_length:
            too_long.append(example.id)
        else:
            kept.append(sequence)
    return kept, too_long


class SequenceDataset(torch.utils.data.Dataset):
    def __init__(self, sequences: list[EncodedSequence]):
        self.sequences = sequences

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, index: int) -> dict:
        # The Trainer's length-grouped sampler reads len(item["input_ids"]).
        sequence = self.sequences[index]
        return {"input_ids": sequence.input_ids, "sequence": sequence}


class SequenceCollator:
    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        batch = pad_batch([item["sequence"] for item in items], self.pad_id, side="right")
        batch.pop("carried")
        return batch


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy (batch, seq-1) of predicting labels[t+1] from logits[t]; 0 where ignored."""
    shifted_logits = logits[:, :-1].float()  # (batch, seq-1, vocab)
    targets = labels[:, 1:]  # (batch, seq-1)
    losses = torch.nn.functional.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.shape[-1]), targets.reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="none",
    )
    return losses.view(targets.shape)


def _make_trainer_class():
    from transformers import Trainer

    class CompressionTrainer(Trainer):
        """A `Trainer` whose loss runs the model under the compression mask."""

        def __init__(self, *args, comp_ids, mode, keep_prompt, **kwargs):
            super().__init__(*args, **kwargs)
            self.comp_ids = list(comp_ids)
            self.mode = mode
            self.keep_prompt = keep_prompt

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            outputs = compressed_forward(model, inputs, self.comp_ids, self.mode, self.keep_prompt)
            losses = token_losses(outputs.logits, inputs["labels"])
            count = num_items_in_batch if num_items_in_batch is not None else (inputs["labels"][:, 1:] != IGNORE_INDEX).sum()
            loss = losses.sum() / torch.as_tensor(count, device=losses.device).clamp(min=1)
            return (loss, outputs) if return_outputs else loss

    return CompressionTrainer


def _training_arguments(config: TrainCompressorConfig, output_dir: Path, on_cuda: bool, has_eval: bool):
    import dataclasses as dc

    from transformers import TrainingArguments

    names = {f.name for f in dc.fields(TrainingArguments)}
    options = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=config.warmup,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        logging_steps=10,
        logging_first_step=True,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=config.eval_steps,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=2,
        seed=config.seed,
        data_seed=config.seed,
        report_to=config.report_to,
        remove_unused_columns=False,
        bf16=on_cuda and torch.cuda.is_bf16_supported(),
        use_cpu=not on_cuda,
        dataloader_num_workers=0,
        prediction_loss_only=True,
    )
    # transformers >= 5.3 names the length-grouped sampler by a strategy; 5.2 has a flag.
    if "train_sampling_strategy" in names:
        options["train_sampling_strategy"] = "group_by_length"
    elif "group_by_length" in names:
        options["group_by_length"] = True
    if on_cuda:
        # transformers 5.25 renamed gradient checkpointing to activation checkpointing.
        prefix = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
        options[prefix] = True
        options[f"{prefix}_kwargs"] = {"use_reentrant": False}
    return TrainingArguments(**options)


def train_compressor(config: TrainCompressorConfig) -> dict:
    """Train the compressor on the training split of annotated data and save it to `config.out`.

    Returns a summary (steps, losses, time, over-length counts), also written to
    `training_summary.json` in the output folder.
    """
    from dyncomp.compression.lora import CompressorConfig, attach_conditional_lora, save_compressor

    if not config.out:
        raise UserError("missing --out: give a folder for the trained compressor")
    out = Path(config.out)
    checkpoints = out / "checkpoints"
    if (out / "dyncomp_compressor.json").is_file() and not config.resume:
        raise UserError(f"{out} already contains a trained compressor; choose another --out or delete it")
    if config.resume and not checkpoints.is_dir():
        raise UserError(f"--resume given but {checkpoints} contains no checkpoint; run without --resume to start")

    examples = load_annotated(config.data)
    train = split_annotated(examples, "train", seed=config.seed)
    validation = split_annotated(examples, "validation", seed=config.seed)
    if config.limit is not None:
        train = train[: config.limit]

    loaded = load_model(config.model, device=config.device, dtype=config.dtype)
    model, tokenizer = loaded.model, loaded.tokenizer
    torch.manual_seed(config.seed)
    comp = register_comp_tokens(model, tokenizer, config.k)
    record = token_record(model, tokenizer, comp, config.model)

    train_sequences, train_too_long = encode_examples(tokenizer, train, comp, config.max_length)
    eval_sequences, eval_too_long = encode_examples(tokenizer, validation, comp, config.max_length)
    if train_too_long or eval_too_long:
        logger.warning(
            "%d of %d training and %d of %d validation traces exceed --max-length %d tokens and are left out "
            "(ids listed in training_summary.json); raise --max-length to keep them",
            len(train_too_long), len(train), len(eval_too_long), len(validation), config.max_length,
        )
    if not train_sequences:
        raise UserError(f"no training trace of {config.data} fits in --max-length {config.max_length}; raise it")

    compressor_config = CompressorConfig(
        k=config.k, mode=config.mode, keep_prompt=config.keep_prompt, rank=config.rank,
        alpha=config.alpha, dropout=config.dropout, task_lora=config.task_lora,
    )
    peft_model = attach_conditional_lora(model, comp, compressor_config)
    peft_model.train()
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    logger.info("training %d parameters on %d traces (%d validation)", trainable, len(train_sequences), len(eval_sequences))

    on_cuda = next(model.parameters()).device.type == "cuda"
    trainer_class = _make_trainer_class()
    trainer = trainer_class(
        model=peft_model,
        args=_training_arguments(config, checkpoints, on_cuda, has_eval=bool(eval_sequences)),
        train_dataset=SequenceDataset(train_sequences),
        eval_dataset=SequenceDataset(eval_sequences) if eval_sequences else None,
        data_collator=SequenceCollator(tokenizer.pad_token_id),
        comp_ids=comp.ids,
        mode=config.mode,
        keep_prompt=config.keep_prompt,
    )

    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=True if config.resume else None)
    seconds = time.perf_counter() - started
    metrics = trainer.evaluate() if eval_sequences else {}

    peft_model.eval()
    save_compressor(peft_model, out, record, compressor_config)
    summary = {
        "config": dataclasses.asdict(config),
        "train_traces": len(train_sequences),
        "validation_traces": len(eval_sequences),
        "too_long_train_ids": train_too_long,
        "too_long_validation_ids": eval_too_long,
        "steps": result.global_step,
        "train_loss": result.training_loss,
        "validation_loss": metrics.get("eval_loss"),
        "train_seconds": round(seconds, 1),
        "trainable_parameters": trainable,
        "device": str(next(model.parameters()).device),
        "torch_threads": torch.get_num_threads(),
    }
    (out / "training_summary.json").write_text(json.dumps(summary, indent=2))
    return summary
