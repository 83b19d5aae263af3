"""Compression masks on small sequences whose visibility is written out by hand."""

from __future__ import annotations

import pytest
import torch

from dyncomp.compression.masks import build_compression_mask, logical_position_ids, segment_layout
from dyncomp.errors import UserError

PAD, C0, C1 = 0, 250, 251


def visibility(mask: torch.Tensor, row: int = 0) -> list[str]:
    """Render one row of a `(batch, 1, seq, seq)` additive mask: 'x' where a query attends to a key, '.' elsewhere."""
    allowed = mask[row, 0] == 0
    return ["".join("x" if seen else "." for seen in query) for query in allowed.tolist()]


def single(tokens: list[int], prompt_length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    input_ids = torch.tensor([tokens])
    attention_mask = torch.ones_like(input_ids)
    prompt_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    prompt_mask[:, :prompt_length] = True
    return input_ids, attention_mask, prompt_mask


# Prompt p p, step a b c, one <COMP>, step d e.
ONE_COMP = [11, 12, 21, 22, 23, C0, 31, 32]


def test_concat_mask_prompt_step_comp_step():
    mask = build_compression_mask(*single(ONE_COMP, 2), (C0,))
    assert visibility(mask) == [
        # p p a b c C d e
        "x.......",
        "xx......",
        "xxx.....",
        "xxxx....",
        "xxxxx...",
        "xxxxxx..",
        "xx...xx.",
        "xx...xxx",
    ]


def test_concat_mask_without_prompt_keeps_first_token():
    mask = build_compression_mask(*single(ONE_COMP, 2), (C0,), keep_prompt=False)
    assert visibility(mask) == [
        "x.......",
        "xx......",
        "xxx.....",
        "xxxx....",
        "xxxxx...",
        "xxxxxx..",
        "x....xx.",
        "x....xxx",
    ]


def test_concat_mask_group_of_two_comp_tokens():
    tokens = [11, 12, 21, 22, 23, C0, C1, 31, 32]
    mask = build_compression_mask(*single(tokens, 2), (C0, C1))
    assert visibility(mask) == [
        # p p a b c C C d e
        "x........",
        "xx.......",
        "xxx......",
        "xxxx.....",
        "xxxxx....",
        "xxxxxx...",
        "xxxxxxx..",
        "xx...xxx.",
        "xx...xxxx",
    ]


def test_concat_mask_memory_accumulates_over_steps():
    tokens = [11, 21, C0, 31, C0, 41]
    mask = build_compression_mask(*single(tokens, 1), (C0,))
    assert visibility(mask) == [
        # p a C b C c
        "x.....",
        "xx....",
        "xxx...",
        "x.xx..",
        "x.xxx.",
        "x.x.xx",
    ]


def test_concat_mask_hides_padding():
    input_ids = torch.tensor([[PAD, PAD, 11, 21, C0, 31], [11, 12, 21, 22, C0, 31]])
    attention_mask = (input_ids != PAD).long()
    prompt_mask = torch.tensor([[0, 0, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    mask = build_compression_mask(input_ids, attention_mask, prompt_mask, (C0,))

    assert mask.shape == (2, 1, 6, 6)
    assert visibility(mask, 0) == [
        # _ _ p a C b
        "x.....",
        ".x....",
        "..x...",
        "..xx..",
        "..xxx.",
        "..x.xx",
    ]
    assert visibility(mask, 1) == [
        # p p a b C c
        "x.....",
        "xx....",
        "xxx...",
        "xxxx..",
        "xxxxx.",
        "xx..xx",
    ]


def test_mask_values_are_zero_and_dtype_min():
    mask = build_compression_mask(*single(ONE_COMP, 2), (C0,), dtype=torch.bfloat16)
    assert mask.dtype == torch.bfloat16
    assert set(mask.unique().tolist()) == {0.0, torch.finfo(torch.bfloat16).min}


def test_segment_layout_numbers_steps_and_marks_group_ends():
    tokens = [11, 12, 21, C0, C1, C0, C1, 31]
    layout = segment_layout(*single(tokens, 2), (C0, C1))
    assert layout.step.tolist() == [[0, 0, 0, 0, 0, 1, 1, 2]]
    assert layout.is_comp.tolist() == [[False, False, False, True, True, True, True, False]]
    assert layout.closes_step.tolist() == [[False, False, False, False, True, False, True, False]]
    assert layout.is_first_prompt.tolist() == [[True] + [False] * 7]
    assert layout.is_content.tolist() == [[False, False, True, False, False, False, False, True]]


def test_logical_positions_skip_left_padding():
    attention_mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert logical_position_ids(attention_mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


def test_merge_mode_raises_user_error():
    with pytest.raises(UserError, match="merge.*not supported yet.*concat"):
        build_compression_mask(*single(ONE_COMP, 2), (C0,), mode="merge")


def test_unknown_mode_raises_user_error():
    with pytest.raises(UserError, match="unknown compression mode 'sum'"):
        build_compression_mask(*single(ONE_COMP, 2), (C0,), mode="sum")


def test_comp_group_out_of_order_raises():
    with pytest.raises(UserError, match="position 3"):
        segment_layout(*single([11, 21, 22, C1, C0, 31], 1), (C0, C1))


def test_incomplete_comp_group_raises():
    with pytest.raises(UserError, match="position 2"):
        segment_layout(*single([11, 21, C0, 31], 1), (C0, C1))


def test_comp_group_cut_by_sequence_end_is_accepted():
    layout = segment_layout(*single([11, 21, C0], 1), (C0, C1))
    assert not layout.closes_step.any()


def test_comp_inside_prompt_raises():
    with pytest.raises(UserError, match="marks a <COMP> token as prompt"):
        segment_layout(*single([11, C0, 21], 2), (C0,))


def test_prompt_after_reasoning_raises():
    input_ids, attention_mask, prompt_mask = single([11, 21, 12, 22], 1)
    prompt_mask[0, 2] = True
    with pytest.raises(UserError, match="prompt must be a prefix"):
        segment_layout(input_ids, attention_mask, prompt_mask, (C0,))
