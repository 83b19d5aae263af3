"""The benchmark's reference-style decoder must decode what the engine decodes, or its timing means nothing."""

from __future__ import annotations

import pytest

from conftest import make_tiny_model
from dyncomp.bench.reference import reference_generate
from dyncomp.bench.runner import TARGETS, format_table
from dyncomp.compression.lora import CompressorConfig, attach_conditional_lora
from dyncomp.compression.verify import randomize_adapter
from dyncomp.generation.engine import CompressingEngine, DecodingConfig
from dyncomp.models.tokens import register_comp_tokens
from dyncomp.policies import make_policy


@pytest.mark.parametrize("method", ["none", "interval:6"])
def test_reference_decoder_matches_engine(packaged_tokenizer, method):
    model = make_tiny_model("llama", vocab_size=len(packaged_tokenizer), seed=8)
    comp = register_comp_tokens(model, packaged_tokenizer, 1)
    peft_model = attach_conditional_lora(model, comp, CompressorConfig())
    randomize_adapter(peft_model, scale=0.05)
    peft_model.eval()
    prompt = "Sara has 4 boxes of 6 pencils. How many pencils does she have?"

    engine = CompressingEngine(peft_model, packaged_tokenizer, comp)
    expected = engine.generate([prompt], make_policy(method, min_step_tokens=1), DecodingConfig(max_new_tokens=20, ignore_eos=True))[0]
    tokens, seconds, prompt_seconds = reference_generate(peft_model, packaged_tokenizer, comp, prompt, make_policy(method, min_step_tokens=1), 20)

    assert tokens == expected.token_ids
    assert seconds > prompt_seconds > 0


def test_bench_table_marks_targets():
    ratios = {key: target for key, (target, _) in TARGETS.items()}
    ratios["vs_reference_loop"] = 2.0
    ratios["classifier_share"] = 0.5
    table = format_table({"ratios": ratios})
    assert "| `none_vs_hf_generate` | 0.950 | >= 0.95 | yes |" in table
    assert "| `vs_reference_loop` | 2.000 | >= 8.0 | no |" in table
    assert "| `classifier_share` | 0.500 | <= 0.01 | no |" in table


def test_time_per_token_alternates_methods():
    from types import SimpleNamespace

    from dyncomp.bench.runner import Bench

    calls = []

    def run_engine(engine, prompts, method, length):
        calls.append((method, length))
        return [SimpleNamespace(n_generated=length, kv_bytes_peak=len(method))], length * 0.01

    bench = Bench.__new__(Bench)
    bench.engine, bench.prompts, bench.run_engine = object(), ["prompt"], run_engine

    measured = bench.time_per_token([4, 8])

    assert calls == [("none", 4), ("interval:64", 4), ("classifier", 4), ("none", 8), ("interval:64", 8), ("classifier", 8)]
    assert measured["seconds_per_token"]["none"] == {4: 0.01, 8: 0.01}
    assert measured["peak_bytes_at_longest"] == {"none": 4, "interval:64": 11, "classifier": 10}
