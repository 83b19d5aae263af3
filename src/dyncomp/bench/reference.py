"""A decoder written the way the reference implementation decodes, as a speed baseline.

It follows the reference's description: one sequence at a time, a Python loop per token, every
layer's hidden states requested at each step to read the last one, `<COMP>` fed as a pass of
its own, and a new cache built at each compression from the slots that stay. It exists only to
be timed against `CompressingEngine`; it is not used for results.
"""

from __future__ import annotations

import time

import torch

from dyncomp.compression.cache import cache_argument_name
from dyncomp.policies.base import DecodeState, Policy


def _rebuild_cache(cache, keep: torch.Tensor):
    """Return a new DynamicCache holding only the slots in `keep` (slot indices) of every layer."""
    from transformers import DynamicCache

    fresh = DynamicCache()
    for index, layer in enumerate(cache.layers):
        keys = layer.keys[:, :, keep].clone()  # (1, kv_heads, kept, head_dim)
        values = layer.values[:, :, keep].clone()
        fresh.update(keys, values, index)
    return fresh


@torch.inference_mode()
def reference_generate(model, tokenizer, comp, prompt: str, policy: Policy, max_new_tokens: int, ignore_eos: bool = True) -> tuple[list[int], float, float]:
    """Decode one prompt greedily; returns the generated ids (`<COMP>` included), the wall seconds and the prompt pass's seconds."""
    from transformers import DynamicCache

    cache_argument = cache_argument_name(model)
    device = next(model.parameters()).device
    started = time.perf_counter()
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)
    prompt_length = ids.shape[1]
    cache = DynamicCache()
    output = model(input_ids=ids, output_hidden_states=True, use_cache=True, **{cache_argument: cache})
    prompt_seconds = time.perf_counter() - started
    position = prompt_length
    roles = ["prompt"] * prompt_length
    generated: list[int] = []
    step_length = 0
    emitted = 0

    while emitted < max_new_tokens:
        logits = output.logits[0, -1].clone()  # (vocab,)
        if comp is not None:
            logits[list(comp.ids)] = torch.finfo(logits.dtype).min
        token = int(logits.argmax())
        generated.append(token)
        emitted += 1
        if not ignore_eos and token == tokenizer.eos_token_id:
            break
        output = model(
            input_ids=torch.tensor([[token]], device=device), position_ids=torch.tensor([[position]], device=device),
            output_hidden_states=True, use_cache=True, **{cache_argument: cache},
        )
        position += 1
        roles.append("step")
        step_length += 1

        hidden = output.hidden_states[-1][:, -1]  # (1, hidden) after the final norm
        state = DecodeState(last_tokens=torch.tensor([token], device=device), step_lengths=torch.tensor([step_length], device=device), hidden=hidden)
        if comp is None or not bool(policy.should_compress(state)[0]):
            continue

        for comp_id in comp.ids:
            output = model(
                input_ids=torch.tensor([[comp_id]], device=device), position_ids=torch.tensor([[position]], device=device),
                output_hidden_states=True, use_cache=True, **{cache_argument: cache},
            )
            position += 1
            roles.append("memory")
            generated.append(comp_id)
        keep = torch.tensor([i for i, role in enumerate(roles) if role != "step"], device=device)
        cache = _rebuild_cache(cache, keep)
        roles = [role for role in roles if role != "step"]
        step_length = 0
    return generated, time.perf_counter() - started, prompt_seconds
