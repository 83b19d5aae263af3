"""Teacher-forced logits of a compressed sequence, computed in parallel and recurrently.

`parallel_logits` is one forward pass under the compression mask, as in training.
`recurrent_logits` decodes the same tokens one at a time with a KV cache that drops each
finished step at its `<COMP>` group, as in inference. Invariant 1 requires the two to agree,
and this module is the reference for that check, not the fast decoding engine.

Both expect the model in eval mode, because dropout would make the two passes differ.
"""

from __future__ import annotations

from typing import Sequence

import torch

from dyncomp.compression.cache import SlotRoles, cache_argument_name, step_drop_mask
from dyncomp.compression.masks import Layout, build_compression_mask, logical_position_ids, segment_layout


def _model_dtype(model: torch.nn.Module) -> torch.dtype:
    return getattr(model, "dtype", None) or next(model.parameters()).dtype


def compressed_forward(model, batch: dict[str, torch.Tensor], comp_ids, mode: str = "concat", keep_prompt: bool = True, **model_kwargs):
    """Run one parallel forward pass under the compression mask with logical positions.

    `batch` holds `input_ids`, `attention_mask` and `prompt_mask`. `model_kwargs` go to the
    model's forward, e.g. `logits_to_keep=1` when only hidden states are read.
    """
    mask = build_compression_mask(
        batch["input_ids"], batch["attention_mask"], batch["prompt_mask"], comp_ids,
        mode=mode, keep_prompt=keep_prompt, dtype=_model_dtype(model),
    )
    positions = logical_position_ids(batch["attention_mask"])
    return model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions, use_cache=False, **model_kwargs)


def parallel_logits(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_mask: torch.Tensor,
    comp_ids: Sequence[int],
    *,
    keep_prompt: bool = True,
) -> torch.Tensor:
    """Return the logits `(batch, seq, vocab)` of one forward pass under the concat compression mask."""
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "prompt_mask": prompt_mask}
    return compressed_forward(model, batch, comp_ids, keep_prompt=keep_prompt).logits


def _slot_roles(layout: Layout) -> torch.Tensor:
    """Return the `SlotRoles` code `(batch, seq)` each token gets when it enters the cache."""
    roles = torch.full_like(layout.step, SlotRoles.STEP, dtype=torch.int8)
    roles[layout.is_prompt] = SlotRoles.PROMPT
    roles[layout.is_comp] = SlotRoles.MEMORY
    roles[layout.is_pad] = SlotRoles.EMPTY
    return roles


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


@torch.no_grad()
def recurrent_logits(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_mask: torch.Tensor,
    comp_ids: Sequence[int],
    *,
    keep_prompt: bool = True,
) -> torch.Tensor:
    """Return the logits `(batch, seq, vocab)` of teacher-forced decoding with a compacting cache.

    The columns before the first non-prompt token of any row are fed in one forward pass, the
    rest one column per forward pass for the whole batch. Right after a row's last `<COMP>` of
    a group is fed, that row's finished step leaves the cache (and with `keep_prompt=False` its
    prompt except the first token), while other rows keep decoding. Logits at padding positions
    are meaningless.
    """
    from transformers import DynamicCache

    layout = segment_layout(input_ids, attention_mask, prompt_mask, comp_ids)
    positions = logical_position_ids(attention_mask)
    token_roles = _slot_roles(layout)
    batch, seq = input_ids.shape
    dtype = _model_dtype(model)
    device = input_ids.device

    # Without a config every layer is a full-attention DynamicLayer, which compaction needs.
    cache = DynamicCache()
    cache_kwargs = {cache_argument_name(model): cache, "use_cache": True}
    roles = SlotRoles.empty(batch, device)
    chunks = []

    reasoning_columns = (~layout.is_prompt & ~layout.is_pad).any(0).nonzero()
    prefill = int(reasoning_columns[0]) if len(reasoning_columns) else seq
    if prefill > 0:
        columns = torch.arange(prefill, device=device)
        causal = columns.unsqueeze(-1) >= columns.unsqueeze(0)  # (prefill, prefill)
        real = ~layout.is_pad[:, :prefill]
        allowed = (causal & real.unsqueeze(-2)) | torch.eye(prefill, dtype=torch.bool, device=device)  # (batch, prefill, prefill)
        out = model(
            input_ids=input_ids[:, :prefill],
            attention_mask=_additive(allowed, dtype).unsqueeze(1),  # (batch, 1, prefill, prefill)
            position_ids=positions[:, :prefill],
            **cache_kwargs,
        )
        chunks.append(out.logits)
        roles.append(token_roles[:, :prefill])

    itself = torch.ones(batch, 1, dtype=torch.bool, device=device)
    for column in range(prefill, seq):
        allowed = torch.cat([roles.valid, itself], dim=-1)  # (batch, L + 1)
        out = model(
            input_ids=input_ids[:, column : column + 1],
            attention_mask=_additive(allowed, dtype)[:, None, None, :],  # (batch, 1, 1, L + 1)
            position_ids=positions[:, column : column + 1],
            **cache_kwargs,
        )
        chunks.append(out.logits)
        roles.append(token_roles[:, column : column + 1])

        compressing = layout.closes_step[:, column]
        if compressing.any():
            roles.compact(cache, step_drop_mask(roles, compressing, keep_prompt))

    return torch.cat(chunks, dim=1)  # (batch, seq, vocab)
