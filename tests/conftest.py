"""Shared fixtures: tiny random models of several families and the packaged tokenizer."""

from __future__ import annotations

from pathlib import Path

import json

import pytest
import torch

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"
GSM8K_TEST = DATA_DIR / "gsm8k" / "test.jsonl"
GSM8K_TRAIN = DATA_DIR / "gsm8k" / "train.jsonl"
ANNOTATED = DATA_DIR / "gsm8k-comp" / "gsm8k_compressed_train.json"

FAMILIES = ("llama", "qwen2", "mistral")


def make_tiny_model(family: str = "llama", vocab_size: int = 256, seed: int = 0, layers: int = 2) -> torch.nn.Module:
    """Build a random causal LM with hidden size 64, in fp32 eval mode with eager attention."""
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    configs = {
        "llama": lambda: LlamaConfig(**common),
        "qwen2": lambda: Qwen2Config(**common, use_sliding_window=False),
        "mistral": lambda: MistralConfig(**common, sliding_window=None),
    }
    torch.manual_seed(seed)
    config = configs[family]()
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    model.eval()
    return model


@pytest.fixture(params=FAMILIES)
def tiny_family(request) -> str:
    return request.param


@pytest.fixture
def tiny_model(tiny_family):
    return make_tiny_model(tiny_family)


@pytest.fixture(scope="session")
def packaged_tokenizer_dir() -> str:
    """The converted folder of the packaged model (converted once per machine, about 20 s)."""
    from dyncomp.errors import UserError
    from dyncomp.models.loading import packaged_gguf_path, convert_gguf

    try:
        return str(convert_gguf(packaged_gguf_path()))
    except UserError as error:
        pytest.skip(f"packaged model unavailable: {error}")


@pytest.fixture
def packaged_tokenizer(packaged_tokenizer_dir):
    """A fresh copy of SmolLM2's tokenizer, left-padded, without `<COMP>` registered."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(packaged_tokenizer_dir)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@pytest.fixture
def shared_data() -> Path:
    if not ANNOTATED.is_file():
        pytest.skip(f"shared data not found at {DATA_DIR}")
    return DATA_DIR


@pytest.fixture
def tiny_run(tmp_path, packaged_tokenizer):
    """A tiny model folder, a randomized compressor for it, and a 6-problem GSM8K file."""
    from dyncomp.compression.lora import CompressorConfig, attach_conditional_lora, save_compressor
    from dyncomp.compression.verify import randomize_adapter
    from dyncomp.models.loading import load_model
    from dyncomp.models.tokens import register_comp_tokens, token_record

    model_dir = tmp_path / "tiny-model"
    make_tiny_model("llama", vocab_size=len(packaged_tokenizer), seed=11).save_pretrained(model_dir)
    packaged_tokenizer.save_pretrained(model_dir)

    loaded = load_model(str(model_dir), device="cpu")
    comp = register_comp_tokens(loaded.model, loaded.tokenizer, 1)
    record = token_record(loaded.model, loaded.tokenizer, comp, str(model_dir))
    peft_model = attach_conditional_lora(loaded.model, comp, CompressorConfig())
    randomize_adapter(peft_model, scale=0.05)
    compressor_dir = tmp_path / "compressor"
    save_compressor(peft_model, compressor_dir, record, CompressorConfig())

    data = tmp_path / "gsm8k.jsonl"
    problems = [{"question": f"Tom has {n} apples and buys {n + 1} more. How many apples?", "answer": f"{n} + {n + 1} = {2 * n + 1}\n#### {2 * n + 1}"} for n in range(6)]
    data.write_text("".join(json.dumps(p) + "\n" for p in problems))
    return {"model": str(model_dir), "compressor": str(compressor_dir), "data": str(data), "out": tmp_path / "eval"}
