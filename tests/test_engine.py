"""The decoding engine: invariants 2 (no compression changes nothing), 3 (batching changes
nothing) and 5 (memory is counted, not estimated)."""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_model
from dyncomp.compression.lora import CompressorConfig, attach_conditional_lora
from dyncomp.compression.verify import randomize_adapter
from dyncomp.generation.engine import CompressingEngine, DecodingConfig
from dyncomp.models.tokens import register_comp_tokens
from dyncomp.policies import make_policy

PROMPTS = [
    "Tom has 3 apples.",
    "A train leaves the station at 9 and travels 60 miles per hour for 2 hours. How far does it go?",
    "Add 12 and 30.",
    "Sara buys 4 pens at 2 dollars each and a book for 7 dollars; what does she pay?",
    "What is 5 times 6?",
    "Count from one to ten.",
    "The answer is",
    "Mia read 20 pages on Monday and twice as many on Tuesday. How many pages did she read in total?",
]


@pytest.fixture
def plain_model(packaged_tokenizer, tiny_family):
    model = make_tiny_model(tiny_family, vocab_size=len(packaged_tokenizer), seed=3)
    return model, packaged_tokenizer


@pytest.fixture
def compressing_model(packaged_tokenizer):
    """A tiny Llama with one `<COMP>` and a randomized conditional LoRA, so compression matters."""
    model = make_tiny_model("llama", vocab_size=len(packaged_tokenizer), seed=5)
    comp = register_comp_tokens(model, packaged_tokenizer, 1)
    peft_model = attach_conditional_lora(model, comp, CompressorConfig(k=1))
    randomize_adapter(peft_model, scale=0.05)
    peft_model.eval()
    return peft_model, packaged_tokenizer, comp


def hf_generate(model, tokenizer, prompts, max_new_tokens):
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        output = model.generate(
            **encoded, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=None, top_k=None, top_p=None, temperature=None,
        )
    return [row[encoded["input_ids"].shape[1]:].tolist() for row in output]


@pytest.mark.parametrize("batch_size", [1, 8])
def test_none_policy_matches_hf_generate(plain_model, batch_size):
    model, tokenizer = plain_model
    prompts = PROMPTS[:batch_size]
    engine = CompressingEngine(model, tokenizer, comp=None)
    engine.eos_ids = set()  # the random model's EOS is arbitrary; compare full-length outputs
    results = engine.generate(prompts, make_policy("none"), DecodingConfig(max_new_tokens=12))
    expected = hf_generate(model, tokenizer, prompts, 12)
    for result, tokens in zip(results, expected):
        assert result.token_ids == tokens


@pytest.mark.parametrize("method", ["interval:5", "newline", "interval:9"])
def test_batching_keeps_tokens_and_comp_points(compressing_model, method):
    model, tokenizer, comp = compressing_model
    engine = CompressingEngine(model, tokenizer, comp)
    engine.eos_ids = set()
    config = DecodingConfig(max_new_tokens=24)
    together = engine.generate(PROMPTS, make_policy(method, min_step_tokens=2), config)
    for prompt, batched in zip(PROMPTS, together):
        alone = engine.generate([prompt], make_policy(method, min_step_tokens=2), config)[0]
        assert batched.token_ids == alone.token_ids
        assert batched.comp_after == alone.comp_after
        assert batched.kv_bytes_peak == alone.kv_bytes_peak


@pytest.mark.parametrize("method", ["none", "interval:5"])
def test_packed_weights_keep_tokens(compressing_model, method):
    # Batch 8 is inside the packed window, so every decoding step runs MKL's packed product there.
    model, tokenizer, comp = compressing_model
    outputs = []
    for packed_weights in (True, False):
        engine = CompressingEngine(model, tokenizer, comp, packed_weights=packed_weights)
        engine.eos_ids = set()
        results = engine.generate(PROMPTS, make_policy(method, min_step_tokens=2), DecodingConfig(max_new_tokens=16))
        outputs.append([r.token_ids for r in results])
    assert outputs[0] == outputs[1]


def test_interval_policy_compresses_on_schedule(compressing_model):
    model, tokenizer, comp = compressing_model
    engine = CompressingEngine(model, tokenizer, comp)
    engine.eos_ids = set()
    result = engine.generate([PROMPTS[1]], make_policy("interval:5", min_step_tokens=1), DecodingConfig(max_new_tokens=22))[0]
    assert result.comp_after == [5, 10, 15, 20]
    assert result.n_comp == 4
    assert result.n_generated == 22
    assert result.text.count("<COMP>") == 4


def test_compression_shrinks_peak_memory(compressing_model):
    model, tokenizer, comp = compressing_model
    engine = CompressingEngine(model, tokenizer, comp)
    engine.eos_ids = set()
    config = DecodingConfig(max_new_tokens=40)
    none = engine.generate([PROMPTS[0]], make_policy("none"), config)[0]
    compressed = engine.generate([PROMPTS[0]], make_policy("interval:8", min_step_tokens=1), config)[0]
    assert compressed.kv_bytes_peak < none.kv_bytes_peak
    assert compressed.kv_bytes_full == none.kv_bytes_full
    assert none.kv_bytes_peak == none.kv_bytes_full == none.kv_bytes_final
    assert compressed.dependency < none.dependency


@pytest.mark.parametrize("keep_prompt", [True, False])
def test_memory_counted_from_cache_tensors(compressing_model, keep_prompt):
    model, tokenizer, comp = compressing_model
    engine = CompressingEngine(model, tokenizer, comp, trace_memory=True)
    engine.eos_ids = set()
    config = DecodingConfig(max_new_tokens=30, keep_prompt=keep_prompt)
    result = engine.generate([PROMPTS[1]], make_policy("interval:6", min_step_tokens=1), config)[0]
    trace = engine.last_stats.memory_trace
    assert trace
    # Batch 1 has no padding slots, so the row's count is exactly the cache's tensor bytes.
    for row_bytes, tensor_bytes in trace:
        assert row_bytes[0] == tensor_bytes
    assert result.kv_bytes_peak == max(row[0] for row, _ in trace)
    assert result.kv_bytes_final <= result.kv_bytes_peak


def test_batch_memory_never_exceeds_cache(compressing_model):
    model, tokenizer, comp = compressing_model
    engine = CompressingEngine(model, tokenizer, comp, trace_memory=True)
    engine.eos_ids = set()
    engine.generate(PROMPTS, make_policy("interval:7", min_step_tokens=1), DecodingConfig(max_new_tokens=20))
    stats = engine.last_stats
    for row_bytes, tensor_bytes in stats.memory_trace:
        assert sum(row_bytes) <= tensor_bytes
    # The cache appends into spare slots: allocated memory is the held slots plus at most that headroom.
    assert stats.physical_peak_bytes <= stats.allocated_peak_bytes
    assert stats.allocated_peak_bytes <= stats.physical_peak_bytes + 2 * 32 * len(PROMPTS) * _slot_bytes_per_row(model)


def _slot_bytes_per_row(model) -> int:
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 4


def test_decoding_runs_sdpa_and_restores_eager(compressing_model):
    model, tokenizer, comp = compressing_model
    seen = []
    hook = model.get_base_model().model.layers[0].self_attn.register_forward_pre_hook(
        lambda module, args: seen.append(module.config._attn_implementation)
    )
    try:
        CompressingEngine(model, tokenizer, comp).generate([PROMPTS[0]], make_policy("none"), DecodingConfig(max_new_tokens=3))
    finally:
        hook.remove()
    assert seen and set(seen) == {"sdpa"}
    assert model.get_base_model().config._attn_implementation == "eager"


def test_drop_prompt_reduces_memory(compressing_model):
    model, tokenizer, comp = compressing_model
    engine = CompressingEngine(model, tokenizer, comp)
    engine.eos_ids = set()
    kept = engine.generate([PROMPTS[1]], make_policy("interval:6", min_step_tokens=1), DecodingConfig(max_new_tokens=20))[0]
    dropped = engine.generate([PROMPTS[1]], make_policy("interval:6", min_step_tokens=1), DecodingConfig(max_new_tokens=20, keep_prompt=False))[0]
    assert dropped.kv_bytes_final < kept.kv_bytes_final


def test_sampling_is_seeded(compressing_model):
    model, tokenizer, comp = compressing_model
    engine = CompressingEngine(model, tokenizer, comp)
    engine.eos_ids = set()
    config = DecodingConfig(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=7)
    first = engine.generate(PROMPTS[:2], make_policy("interval:4", min_step_tokens=1), config)
    second = engine.generate(PROMPTS[:2], make_policy("interval:4", min_step_tokens=1), config)
    assert [r.token_ids for r in first] == [r.token_ids for r in second]


def test_stop_string_ends_row(plain_model):
    model, tokenizer = plain_model
    engine = CompressingEngine(model, tokenizer, comp=None)
    engine.eos_ids = set()
    free = engine.generate([PROMPTS[0]], make_policy("none"), DecodingConfig(max_new_tokens=10))[0]
    stop = tokenizer.decode(free.token_ids[3:5])
    stopped = engine.generate([PROMPTS[0]], make_policy("none"), DecodingConfig(max_new_tokens=10, stop_strings=(stop,)))[0]
    assert stopped.stop_reason == "stop"
    assert stopped.n_generated <= 5


def test_forced_tokens_match_teacher_forced_walk(compressing_model):
    from dyncomp.evaluation.retention import teacher_forced_boundaries
    from dyncomp.training.encoding import Reasoning

    model, tokenizer, comp = compressing_model
    engine = CompressingEngine(model, tokenizer, comp)
    prompt = tokenizer(PROMPTS[1], add_special_tokens=False)["input_ids"]
    reasoning_ids = tokenizer("First 3 * 5 = 15.\nThen 24 - 15 = 9.\nSo the answer is 9.\n#### 9", add_special_tokens=False)["input_ids"]
    policy = make_policy("newline", min_step_tokens=2)
    policy.prepare(tokenizer)

    result = engine.generate([prompt], policy, forced=[reasoning_ids])[0]
    walk = teacher_forced_boundaries(policy, Reasoning("r", prompt, reasoning_ids, []))

    assert [t for t in result.token_ids if t not in comp.ids] == reasoning_ids
    assert [after - 1 for after in result.comp_after] == [b for b in walk if b < len(reasoning_ids) - 1]
    assert result.n_comp >= 2


def test_too_long_request_rejected(plain_model):
    from dyncomp.errors import UserError

    model, tokenizer = plain_model
    engine = CompressingEngine(model, tokenizer, comp=None)
    with pytest.raises(UserError, match="exceeds the model's 2048 positions"):
        engine.generate([PROMPTS[0]], make_policy("none"), DecodingConfig(max_new_tokens=2100))
