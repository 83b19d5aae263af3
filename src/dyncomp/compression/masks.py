"""Attention masks that make one parallel forward pass behave like decoding with compression.

A sequence is `[prompt][step 0][COMP x k][step 1][COMP x k]...[last step]`, where a group of
k consecutive `<COMP>` tokens (ids `comp_ids[0]` to `comp_ids[k-1]`, in that order) closes a
step. Under the `concat` mask a token of step j attends to the prompt, the `<COMP>` tokens of
steps before j and the earlier tokens of step j. A `<COMP>` token of step j also attends to every
token of step j and to the earlier `<COMP>` tokens of its own group, which is how the group
summarises the step before the step's own keys and values leave the cache.

The mask is additive, shape `(batch, 1, query, key)`, with 0 where attention is allowed and
`torch.finfo(dtype).min` where it is not. With transformers 5.25, a 4D mask passed as
`attention_mask` bypasses the model's own mask construction and is added to the attention
scores as given, by both the eager and the sdpa attention. This also means that a sliding window
in the model config is not applied under this mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from dyncomp.errors import UserError

MODES = ("concat", "merge")


@dataclass(frozen=True)
class Layout:
    """The role of every token of a padded batch, each field of shape `(batch, seq)`."""

    step: torch.Tensor
    """Index of the reasoning step of each token. A `<COMP>` group has the index of the step it closes, and prompt tokens have 0."""
    is_comp: torch.Tensor
    is_prompt: torch.Tensor
    is_pad: torch.Tensor
    closes_step: torch.Tensor
    """True on the last `<COMP>` of each group, after which decoding compacts the cache."""
    is_first_prompt: torch.Tensor
    """True on the first prompt token of each row, the one prompt token `keep_prompt=False` keeps."""

    @property
    def is_content(self) -> torch.Tensor:
        """Real tokens of the reasoning steps: neither prompt, nor `<COMP>`, nor padding."""
        return ~(self.is_prompt | self.is_comp | self.is_pad)


def logical_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Return position ids `(batch, seq)` that count real tokens only, so left padding does not shift them.

    Padding positions get 0; their outputs are never used.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def segment_layout(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_mask: torch.Tensor,
    comp_ids: Sequence[int],
) -> Layout:
    """Find the step, `<COMP>`, prompt and padding role of every token of a padded batch.

    `input_ids`, `attention_mask` and the bool `prompt_mask` all have shape `(batch, seq)`.
    Raises `UserError` when a row breaks the sequence format. That is a `<COMP>` group out of
    order or incomplete, a `<COMP>` inside the prompt, or prompt tokens that are not a prefix of
    the real tokens. A group cut short by the end of the row is accepted.
    """
    if not comp_ids:
        raise UserError("comp_ids is empty; pass the ids of the registered <COMP> tokens")
    if input_ids.shape != attention_mask.shape or input_ids.shape != prompt_mask.shape:
        raise UserError(
            f"input_ids {tuple(input_ids.shape)}, attention_mask {tuple(attention_mask.shape)} and "
            f"prompt_mask {tuple(prompt_mask.shape)} must have the same (batch, seq) shape"
        )
    k = len(comp_ids)
    is_pad = attention_mask == 0
    real = ~is_pad

    comp_table = torch.as_tensor(list(comp_ids), device=input_ids.device)
    matches = input_ids.unsqueeze(-1) == comp_table  # (batch, seq, k)
    is_comp = matches.any(-1) & real
    # The index of each <COMP> token inside its group, from 0 to k-1, and -1 on other tokens.
    offset = torch.where(is_comp, matches.long().argmax(-1), torch.full_like(input_ids, -1))
    _check_groups(offset, is_comp, is_pad, k)

    is_prompt = prompt_mask.bool() & real
    _check_prompt(is_prompt, is_comp, real)

    group_start = is_comp & (offset == 0)
    step = group_start.long().cumsum(-1) - is_comp.long()
    return Layout(
        step=step,
        is_comp=is_comp,
        is_prompt=is_prompt,
        is_pad=is_pad,
        closes_step=is_comp & (offset == k - 1),
        is_first_prompt=is_prompt & (is_prompt.long().cumsum(-1) == 1),
    )


def _check_groups(offset: torch.Tensor, is_comp: torch.Tensor, is_pad: torch.Tensor, k: int) -> None:
    before = torch.nn.functional.pad(offset[:, :-1], (1, 0), value=-1)
    after = torch.nn.functional.pad(offset[:, 1:], (0, 1), value=-1)
    row_ends_next = torch.nn.functional.pad(is_pad[:, 1:], (0, 1), value=True)

    bad_start = is_comp & (offset > 0) & (before != offset - 1)
    bad_end = is_comp & (offset < k - 1) & (after != offset + 1) & ~row_ends_next
    bad = bad_start | bad_end
    if bad.any():
        row, column = (int(i) for i in bad.nonzero()[0])
        raise UserError(
            f"row {row}, position {column}: a <COMP> group must be the {k} <COMP> tokens in order, with nothing "
            "between them; fix the <COMP> markers of that sequence"
        )


def _check_prompt(is_prompt: torch.Tensor, is_comp: torch.Tensor, real: torch.Tensor) -> None:
    comp_in_prompt = is_prompt & is_comp
    if comp_in_prompt.any():
        row, column = (int(i) for i in comp_in_prompt.nonzero()[0])
        raise UserError(f"row {row}, position {column}: prompt_mask marks a <COMP> token as prompt; <COMP> may only follow the prompt")

    after_reasoning = (real & ~is_prompt).long().cumsum(-1) > 0
    late_prompt = is_prompt & after_reasoning
    if late_prompt.any():
        row, column = (int(i) for i in late_prompt.nonzero()[0])
        raise UserError(f"row {row}, position {column}: prompt_mask is true after a non-prompt token; the prompt must be a prefix of the real tokens")


def build_compression_mask(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_mask: torch.Tensor,
    comp_ids: Sequence[int],
    *,
    mode: str = "concat",
    keep_prompt: bool = True,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Build the additive compression mask `(batch, 1, seq, seq)` for a padded batch.

    With `keep_prompt=False`, tokens after the first `<COMP>` group see only the first prompt
    token instead of the prompt, which reproduces the reference implementation. No query attends
    to a padding key. Every query attends at least to itself, so no softmax row is empty and no
    NaN appears, even on padding rows, whose outputs are meaningless.
    """
    if mode not in MODES:
        raise UserError(f"unknown compression mode '{mode}'; use one of {', '.join(MODES)}")
    if mode == "merge":
        # NOTE: merge keeps k slots holding the running mean of the keys and values of all
        # compressions so far. A mean of cached keys and values is not a weighting of the raw keys
        # that a mask can express, because softmax is not linear in the keys.
        raise UserError("compression mode 'merge' is not supported yet; use mode 'concat'")

    layout = segment_layout(input_ids, attention_mask, prompt_mask, comp_ids)
    seq = input_ids.shape[1]

    # Query-side tensors get shape (batch, seq, 1) and key-side tensors (batch, 1, seq), so every
    # rule below broadcasts to (batch, seq, seq).
    step_q, step_k = layout.step.unsqueeze(-1), layout.step.unsqueeze(-2)
    comp_q, comp_k = layout.is_comp.unsqueeze(-1), layout.is_comp.unsqueeze(-2)
    real = ~layout.is_pad
    same_step = step_q == step_k

    prompt_visible = torch.full_like(same_step, keep_prompt) | (step_q == 0) | layout.is_first_prompt.unsqueeze(-2)
    sees_prompt = layout.is_prompt.unsqueeze(-2) & prompt_visible
    sees_memory = comp_k & ((step_k < step_q) | (same_step & comp_q))
    sees_own_step = layout.is_content.unsqueeze(-2) & same_step

    positions = torch.arange(seq, device=input_ids.device)
    causal = positions.unsqueeze(-1) >= positions.unsqueeze(0)  # (seq, seq)
    allowed = causal & real.unsqueeze(-1) & real.unsqueeze(-2) & (sees_prompt | sees_memory | sees_own_step)
    allowed = allowed | torch.eye(seq, dtype=torch.bool, device=input_ids.device)

    mask = torch.zeros(allowed.shape, dtype=dtype, device=input_ids.device)
    mask = mask.masked_fill(~allowed, torch.finfo(dtype).min)
    return mask.unsqueeze(1)  # (batch, 1, seq, seq)
