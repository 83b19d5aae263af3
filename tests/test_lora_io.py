"""Saving and loading the conditional LoRA, and the checks that guard loading."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from conftest import make_tiny_model
from dyncomp.compression import CompressorConfig, attach_conditional_lora, load_compressor, save_compressor
from dyncomp.compression.lora import METADATA_FILE
from dyncomp.errors import UserError
from dyncomp.models.tokens import CompTokens, token_record

COMP = CompTokens(strings=("<COMP>",), ids=(250,))


class StubTokenizer:
    """Stands in for a tokenizer where only its length is read."""

    def __len__(self) -> int:
        return 256


def randomize_adapter(peft_model) -> None:
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name or "trainable_tokens_delta" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)


def comp_input() -> torch.Tensor:
    return torch.tensor([[1, 5, 6, 7, COMP.ids[0], 8, 9]])


@pytest.fixture
def saved_compressor(tmp_path):
    """A randomized compressor on the seed-0 tiny Llama, saved; returns its folder and logits on `comp_input()`."""
    model = make_tiny_model("llama", seed=0)
    # The record describes the base model as it is before the adapter changes the <COMP> row.
    record = token_record(model, StubTokenizer(), COMP, "tiny-llama-seed0")
    config = CompressorConfig(rank=4, alpha=8)
    peft_model = attach_conditional_lora(model, COMP, config)
    randomize_adapter(peft_model)
    with torch.no_grad():
        logits = peft_model(input_ids=comp_input()).logits
    out_dir = tmp_path / "compressor"
    save_compressor(peft_model, out_dir, record, config)
    return out_dir, logits


def test_round_trip_gives_identical_logits(saved_compressor):
    out_dir, expected = saved_compressor
    model = make_tiny_model("llama", seed=0)

    peft_model, config = load_compressor(model, StubTokenizer(), COMP, "tiny-llama-seed0", out_dir)
    with torch.no_grad():
        logits = peft_model(input_ids=comp_input()).logits

    assert config == CompressorConfig(rank=4, alpha=8)
    assert torch.equal(logits, expected)


def test_loaded_compressor_is_gated(saved_compressor):
    out_dir, _ = saved_compressor
    base = make_tiny_model("llama", seed=0)
    peft_model, _ = load_compressor(make_tiny_model("llama", seed=0), StubTokenizer(), COMP, "tiny-llama-seed0", out_dir)
    plain = torch.tensor([[1, 5, 6, 7, 8, 9]])

    with torch.no_grad():
        assert torch.equal(peft_model(input_ids=plain).logits, base(input_ids=plain).logits)


def test_saved_folder_layout(saved_compressor):
    out_dir, _ = saved_compressor
    assert (out_dir / "comp" / "adapter_config.json").is_file()
    assert (out_dir / "comp" / "adapter_model.safetensors").is_file()

    metadata = json.loads((out_dir / METADATA_FILE).read_text())
    assert metadata["format_version"] == 1
    assert metadata["record"]["base_model"] == "tiny-llama-seed0"
    assert metadata["config"]["rank"] == 4
    assert metadata["config"]["targets"] == ["q_proj", "k_proj", "v_proj", "o_proj"]


def test_other_base_model_raises_naming_both(saved_compressor):
    out_dir, _ = saved_compressor
    other = make_tiny_model("llama", seed=1)
    with pytest.raises(UserError) as error:
        load_compressor(other, StubTokenizer(), COMP, "tiny-llama-seed1", out_dir)
    assert "tiny-llama-seed0" in str(error.value)
    assert "tiny-llama-seed1" in str(error.value)


def test_other_comp_ids_raise(saved_compressor):
    out_dir, _ = saved_compressor
    moved = CompTokens(strings=("<COMP>",), ids=(251,))
    with pytest.raises(UserError, match="ids \\[251\\]"):
        load_compressor(make_tiny_model("llama", seed=0), StubTokenizer(), moved, "tiny-llama-seed0", out_dir)


def test_missing_folder_raises(tmp_path):
    with pytest.raises(UserError, match="compressor folder not found"):
        load_compressor(make_tiny_model("llama"), StubTokenizer(), COMP, "tiny", tmp_path / "absent")


def test_missing_metadata_raises(saved_compressor):
    out_dir, _ = saved_compressor
    (out_dir / METADATA_FILE).unlink()
    with pytest.raises(UserError, match=f"has no {METADATA_FILE}"):
        load_compressor(make_tiny_model("llama"), StubTokenizer(), COMP, "tiny-llama-seed0", out_dir)


def test_missing_adapter_raises(saved_compressor):
    out_dir, _ = saved_compressor
    (out_dir / "comp" / "adapter_config.json").unlink()
    with pytest.raises(UserError, match="has no adapter"):
        load_compressor(make_tiny_model("llama"), StubTokenizer(), COMP, "tiny-llama-seed0", out_dir)


def test_task_lora_raises_not_supported():
    with pytest.raises(UserError, match="task_lora is not supported yet"):
        attach_conditional_lora(make_tiny_model("llama"), COMP, CompressorConfig(task_lora=True))


def test_merge_mode_raises_not_supported():
    with pytest.raises(UserError, match="'merge' is not supported yet"):
        attach_conditional_lora(make_tiny_model("llama"), COMP, CompressorConfig(mode="merge"))


def test_k_mismatch_raises():
    with pytest.raises(UserError, match="k=2"):
        attach_conditional_lora(make_tiny_model("llama"), COMP, CompressorConfig(k=2))


def test_embedding_rows_for_comp_are_trainable():
    peft_model = attach_conditional_lora(make_tiny_model("llama"), COMP, CompressorConfig())
    trainable = [name for name, parameter in peft_model.named_parameters() if parameter.requires_grad]
    assert any("trainable_tokens_delta" in name for name in trainable)
    assert all("lora_" in name or "trainable_tokens_delta" in name for name in trainable)


def test_tied_embeddings_change_only_comp_logits():
    config = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    torch.manual_seed(0)
    peft_model = attach_conditional_lora(AutoModelForCausalLM.from_config(config, attn_implementation="eager"), COMP, CompressorConfig())
    randomize_adapter(peft_model)
    peft_model.eval()
    plain = torch.tensor([[1, 5, 6, 7, 8]])
    others = [i for i in range(256) if i != COMP.ids[0]]

    with torch.no_grad():
        adapted = peft_model(input_ids=plain).logits
        expected = base(input_ids=plain).logits

    assert torch.equal(adapted[..., others], expected[..., others])
    assert not torch.allclose(adapted[..., COMP.ids[0]], expected[..., COMP.ids[0]])
