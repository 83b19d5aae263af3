"""Check on a real model that training and decoding compute the same thing.

Invariant 1: one parallel forward pass under the compression mask gives, position by position,
the logits of online decoding that drops each finished step from the cache at its `<COMP>`.
Invariant 4: with no `<COMP>` in the input, the adapted model's logits equal the base model's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SAMPLE_PROBLEMS = (
    (
        "A baker makes 24 muffins and sells 3 boxes of 5 muffins. How many muffins are left?",
        [
            "The baker sells 3 boxes of 5 muffins, so 3 * 5 = 15 muffins are sold.",
            "\nThe number left is 24 - 15 = 9.",
            "\nSo 9 muffins are left.\n#### 9",
        ],
    ),
    (
        "Tom reads 12 pages a day for 4 days and then 20 pages on the fifth day. How many pages does he read?",
        [
            "In the first 4 days Tom reads 12 * 4 = 48 pages.",
            "\nOn the fifth day he reads 20 pages, so 48 + 20 = 68 pages in all.",
            "\n#### 68",
        ],
    ),
)


@dataclass
class VerifyResult:
    parallel_vs_recurrent: float
    """Largest absolute logit difference over real positions (invariant 1)."""
    adapter_vs_base: float
    """Largest absolute logit difference with no `<COMP>` in the input, `<COMP>` columns aside (invariant 4)."""
    comp_changes_output: float
    """Largest difference the adapter makes on a sequence that contains `<COMP>` (shows the check is not vacuous)."""
    tolerance: float

    @property
    def parallel_matches(self) -> bool:
        return self.parallel_vs_recurrent < self.tolerance

    @property
    def adapter_inert(self) -> bool:
        return self.adapter_vs_base == 0.0

    @property
    def passed(self) -> bool:
        return self.parallel_matches and self.adapter_inert


def unsupported_reason(model: torch.nn.Module) -> str | None:
    """Say why a model family cannot run compressed decoding, or return None when it can."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    layer_types = getattr(config, "layer_types", None) or []
    window = getattr(config, "sliding_window", None)
    # Qwen2 configs carry a window size but switch it off with use_sliding_window=False.
    window_active = window is not None and getattr(config, "use_sliding_window", True)
    if "sliding_attention" in layer_types or window_active:
        return (
            f"{config.model_type} uses sliding-window attention (window {window}): its layers mask keys by "
            "physical distance, which breaks once finished steps leave the cache"
        )
    return None


def randomize_adapter(peft_model, seed: int = 0, scale: float = 0.02) -> None:
    """Give an untrained adapter non-zero LoRA-B weights, so the gated path is really exercised."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                noise = torch.randn(parameter.shape, generator=generator) * scale
                parameter.copy_(noise.to(parameter.dtype))


def sample_batch(tokenizer, comp, problems=SAMPLE_PROBLEMS, with_comp: bool = True) -> dict[str, torch.Tensor]:
    """Encode the sample problems, left-padded, with `<COMP>` after each annotated step."""
    from dyncomp.training.encoding import insert_comp, pad_batch, tokenize_reasoning

    sequences = []
    for index, (question, steps) in enumerate(problems):
        reasoning = tokenize_reasoning(tokenizer, f"sample-{index}", question, list(steps))
        sequences.append(insert_comp(reasoning, reasoning.oracle_boundaries if with_comp else [], comp if with_comp else None))
    return pad_batch(sequences, tokenizer.pad_token_id, side="left")


@torch.no_grad()
def verify_invariants(peft_model, tokenizer, comp, keep_prompt: bool = True, tolerance: float = 1e-4) -> VerifyResult:
    from dyncomp.compression.recurrent import parallel_logits, recurrent_logits

    device = next(peft_model.parameters()).device
    batch = {name: t.to(device) for name, t in sample_batch(tokenizer, comp).items()}
    arguments = (peft_model, batch["input_ids"], batch["attention_mask"], batch["prompt_mask"], list(comp.ids))
    parallel = parallel_logits(*arguments, keep_prompt=keep_prompt)
    recurrent = recurrent_logits(*arguments, keep_prompt=keep_prompt)
    real = batch["attention_mask"].bool()
    difference = (parallel - recurrent).abs()[real].max().item()

    plain = {name: t.to(device) for name, t in sample_batch(tokenizer, comp, with_comp=False).items()}
    adapted = peft_model(input_ids=plain["input_ids"], attention_mask=plain["attention_mask"]).logits
    with peft_model.disable_adapter():
        base = peft_model(input_ids=plain["input_ids"], attention_mask=plain["attention_mask"]).logits
        base_with_comp = parallel_logits(*arguments, keep_prompt=keep_prompt)
    # With tied embeddings (SmolLM2) the trained <COMP> input rows are also the <COMP> output rows,
    # so only the <COMP> logit columns may differ; every other column must match exactly.
    other_columns = torch.ones(adapted.shape[-1], dtype=torch.bool, device=adapted.device)
    other_columns[list(comp.ids)] = False
    inert = (adapted - base)[..., other_columns].abs()[plain["attention_mask"].bool()].max().item()
    effect = (parallel - base_with_comp).abs()[real].max().item()
    return VerifyResult(difference, inert, effect, tolerance)
