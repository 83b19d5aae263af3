"""Invariant 1 (parallel equals recurrent) and invariant 4 (the LoRA touches only `<COMP>` rows)."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from conftest import make_tiny_model
from dyncomp.compression import (
    CompGate,
    CompressorConfig,
    attach_conditional_lora,
    cache_argument_name,
    comp_gate,
    logical_position_ids,
    parallel_logits,
    recurrent_logits,
)
from dyncomp.models.tokens import CompTokens

PAD = 0
TOLERANCE = 1e-4


def comp_tokens(k: int) -> CompTokens:
    return CompTokens(strings=tuple(f"<COMP_{i}>" for i in range(k)), ids=tuple(250 + i for i in range(k)))


def compressed_batch(comp: CompTokens) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three left-padded rows with prompts of 3, 5 and 2 tokens and different `<COMP>` groups.

    Row 0 compresses twice. Row 1 compresses a one-token step, then an empty step, then a
    longer one. Row 2 compresses once, late, and ends right after its group.
    """
    group = list(comp.ids)
    rows = [
        ([1, 5, 6], [10, 11, 12, *group, 13, 14, *group, 15, 16, 17]),
        ([1, 5, 6, 7, 8], [20, *group, *group, 21, 22, 23, 24, *group, 25]),
        ([1, 3], [30, 31, 32, 33, 34, 35, 36, *group]),
    ]
    seq = max(len(prompt) + len(rest) for prompt, rest in rows)
    input_ids = torch.full((len(rows), seq), PAD)
    prompt_mask = torch.zeros(len(rows), seq, dtype=torch.bool)
    for row, (prompt, rest) in enumerate(rows):
        start = seq - len(prompt) - len(rest)
        input_ids[row, start:] = torch.tensor(prompt + rest)
        prompt_mask[row, start : start + len(prompt)] = True
    return input_ids, (input_ids != PAD).long(), prompt_mask


def randomize_adapter(peft_model, seed: int = 1) -> None:
    """Give lora_B and the `<COMP>` embedding rows random values, so the adapter changes outputs."""
    generator = torch.Generator().manual_seed(seed)
    changed = 0
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name or "trainable_tokens_delta" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
                changed += 1
    assert changed > 0


def adapted_model(family: str, k: int, attention: str = "eager"):
    model = make_tiny_model(family)
    model.set_attn_implementation(attention)
    comp = comp_tokens(k)
    peft_model = attach_conditional_lora(model, comp, CompressorConfig(k=k))
    randomize_adapter(peft_model)
    peft_model.eval()
    return peft_model, comp


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("keep_prompt", [True, False], ids=["keep_prompt", "first_token_only"])
@pytest.mark.parametrize("k", [1, 2])
def test_parallel_equals_recurrent(tiny_family, k, keep_prompt, attention):
    peft_model, comp = adapted_model(tiny_family, k, attention)
    input_ids, attention_mask, prompt_mask = compressed_batch(comp)
    real = attention_mask.bool()

    with torch.no_grad():
        parallel = parallel_logits(peft_model, input_ids, attention_mask, prompt_mask, comp.ids, keep_prompt=keep_prompt)
    recurrent = recurrent_logits(peft_model, input_ids, attention_mask, prompt_mask, comp.ids, keep_prompt=keep_prompt)

    assert parallel.shape == recurrent.shape == (*input_ids.shape, peft_model.config.vocab_size)
    difference = (parallel - recurrent).abs()[real].max().item()
    assert difference < TOLERANCE


def test_recurrent_differs_from_plain_causal(tiny_family):
    peft_model, comp = adapted_model(tiny_family, k=1)
    input_ids, attention_mask, prompt_mask = compressed_batch(comp)
    real = attention_mask.bool()

    with torch.no_grad():
        causal = peft_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=logical_position_ids(attention_mask)).logits
    recurrent = recurrent_logits(peft_model, input_ids, attention_mask, prompt_mask, comp.ids)

    assert (causal - recurrent).abs()[real].max().item() > 100 * TOLERANCE


def test_recurrent_keep_prompt_changes_logits(tiny_family):
    peft_model, comp = adapted_model(tiny_family, k=1)
    batch = compressed_batch(comp)
    real = batch[1].bool()

    kept = recurrent_logits(peft_model, *batch, comp.ids, keep_prompt=True)
    dropped = recurrent_logits(peft_model, *batch, comp.ids, keep_prompt=False)

    assert (kept - dropped).abs()[real].max().item() > 100 * TOLERANCE


def plain_batch() -> tuple[torch.Tensor, torch.Tensor]:
    input_ids = torch.tensor([[PAD, PAD, 1, 5, 6, 7, 8], [1, 9, 10, 11, 12, 13, 14]])
    return input_ids, (input_ids != PAD).long()


def test_no_comp_input_gives_base_logits_exactly(tiny_family):
    base = make_tiny_model(tiny_family)
    peft_model, comp = adapted_model(tiny_family, k=2)
    input_ids, attention_mask = plain_batch()

    with torch.no_grad():
        adapted = peft_model(input_ids=input_ids, attention_mask=attention_mask).logits
        expected = base(input_ids=input_ids, attention_mask=attention_mask).logits

    assert torch.equal(adapted, expected)


def test_comp_input_changes_logits(tiny_family):
    base = make_tiny_model(tiny_family)
    peft_model, comp = adapted_model(tiny_family, k=2)
    input_ids, attention_mask = plain_batch()
    input_ids[1, 3:5] = torch.tensor(comp.ids)

    with torch.no_grad():
        adapted = peft_model(input_ids=input_ids, attention_mask=attention_mask).logits
        expected = base(input_ids=input_ids, attention_mask=attention_mask).logits

    assert torch.equal(adapted[0], expected[0])
    assert torch.equal(adapted[1, :3], expected[1, :3])
    assert not torch.allclose(adapted[1, 3:], expected[1, 3:], atol=1e-3)


@pytest.mark.parametrize("dropout_in_train_mode", [False, True], ids=["eval", "train_mode_no_dropout"])
def test_rows_only_update_matches_masked_update(tiny_family, dropout_in_train_mode):
    # Without gradients the LoRA update is computed for the <COMP> rows only. With them, PEFT
    # computes it for every row and the gate zeroes the rest. Both must give the same logits.
    peft_model, comp = adapted_model(tiny_family, k=2)
    if dropout_in_train_mode:
        peft_model.train()  # dropout is 0, so the rows-only path still applies
    input_ids, attention_mask = plain_batch()
    input_ids[1, 3:5] = torch.tensor(comp.ids)
    input_ids[0, 6] = comp.ids[1]

    gate = comp_gate(peft_model)
    updates = []
    rows_update = gate._rows_update
    gate._rows_update = lambda comp_rows: updates.append(comp_rows.tolist()) or rows_update(comp_rows)

    masked_full = peft_model(input_ids=input_ids, attention_mask=attention_mask).logits.detach()
    assert updates == []
    with torch.inference_mode():
        rows_only = peft_model(input_ids=input_ids, attention_mask=attention_mask).logits

    assert torch.allclose(rows_only, masked_full, atol=TOLERANCE)
    assert updates and all(rows == [6, 10, 11] for rows in updates)  # (batch * seq) indices of the <COMP> tokens
    assert not gate._row_hooks
    assert not any(layer._disable_adapters for layer in gate._lora_layers)


def decode_step_by_step(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Feed the first half in one call and the rest one token per call with a cache; returns all logits."""
    cache = DynamicCache()
    kwargs = {cache_argument_name(model): cache, "use_cache": True}
    half = input_ids.shape[1] // 2
    chunks = [model(input_ids=input_ids[:, :half], **kwargs).logits]
    for column in range(half, input_ids.shape[1]):
        chunks.append(model(input_ids=input_ids[:, column : column + 1], **kwargs).logits)
    return torch.cat(chunks, dim=1)


def test_gate_follows_decoding_with_cache(tiny_family):
    base = make_tiny_model(tiny_family)
    peft_model, comp = adapted_model(tiny_family, k=1)
    plain = torch.tensor([[1, 5, 6, 7, 8, 9, 10, 11]])
    with_comp = plain.clone()
    with_comp[0, 5] = comp.ids[0]

    with torch.no_grad():
        assert torch.equal(decode_step_by_step(peft_model, plain), decode_step_by_step(base, plain))
        adapted = decode_step_by_step(peft_model, with_comp)
        expected = decode_step_by_step(base, with_comp)

    assert torch.equal(adapted[:, :5], expected[:, :5])
    assert not torch.allclose(adapted[:, 5:], expected[:, 5:], atol=1e-3)


def test_removing_gate_applies_lora_everywhere(tiny_family):
    base = make_tiny_model(tiny_family)
    peft_model, comp = adapted_model(tiny_family, k=1)
    input_ids, attention_mask = plain_batch()

    comp_gate(peft_model).remove()
    with torch.no_grad():
        ungated = peft_model(input_ids=input_ids, attention_mask=attention_mask).logits
        expected = base(input_ids=input_ids, attention_mask=attention_mask).logits
        assert not torch.allclose(ungated, expected, atol=1e-3)

        with CompGate(peft_model, comp.ids):
            gated = peft_model(input_ids=input_ids, attention_mask=attention_mask).logits
        after_block = peft_model(input_ids=input_ids, attention_mask=attention_mask).logits

    assert torch.equal(gated, expected)
    assert torch.equal(after_block, ungated)


def test_gate_rejects_inputs_embeds_only(tiny_family):
    peft_model, comp = adapted_model(tiny_family, k=1)
    input_ids, _ = plain_batch()
    embeddings = peft_model.get_input_embeddings()(input_ids)

    with pytest.raises(ValueError, match="call the model with input_ids"):
        peft_model(inputs_embeds=embeddings)
