"""Turn annotated reasoning into token sequences with `<COMP>` groups at chosen boundaries.

Reasoning is tokenized step by step (the pieces between annotation markers), so the reasoning
tokens are identical whatever boundaries a method compresses at. That makes the NLL of two
methods comparable token for token: only where the `<COMP>` groups sit differs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dyncomp.models.tokens import CompTokens
from dyncomp.prompting import format_prompt

IGNORE_INDEX = -100


@dataclass
class Reasoning:
    """The tokens of one problem: prompt, reasoning, and where annotated steps end."""

    id: str
    prompt_ids: list[int]
    reasoning_ids: list[int]
    """Reasoning and answer tokens, ending with the end-of-turn token."""
    oracle_boundaries: list[int]
    """Indices into `reasoning_ids` after which the annotation puts a `<COMP>`."""
    step_index: list[int] = field(default_factory=list)
    """Annotated step number of each reasoning token (0 for the first step)."""
    number_token: list[bool] = field(default_factory=list)
    """Whether each reasoning token contains a digit."""

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.reasoning_ids)


@dataclass
class EncodedSequence:
    """One model input: prompt, then reasoning with `<COMP>` groups inserted."""

    id: str
    input_ids: list[int]
    labels: list[int]
    """Reasoning and answer tokens; IGNORE_INDEX on prompt and `<COMP>` tokens."""
    prompt_length: int
    carried: list[bool]
    """Number tokens of annotated steps after the first: values a later step must carry over."""
    n_comp_groups: int


def tokenize_reasoning(tokenizer, example_id: str, question: str, steps: list[str]) -> Reasoning:
    """Tokenize the prompt and each annotated step; the last step gets the end-of-turn token."""
    prompt_ids = tokenizer(format_prompt(tokenizer, question), add_special_tokens=False)["input_ids"]
    reasoning_ids: list[int] = []
    boundaries: list[int] = []
    step_index: list[int] = []
    for number, step in enumerate(steps):
        ids = tokenizer(step, add_special_tokens=False)["input_ids"]
        reasoning_ids.extend(ids)
        step_index.extend([number] * len(ids))
        if number < len(steps) - 1 and reasoning_ids:
            boundaries.append(len(reasoning_ids) - 1)
    eos = tokenizer.eos_token_id
    if eos is not None:
        reasoning_ids.append(eos)
        step_index.append(len(steps) - 1)

    pieces = tokenizer.convert_ids_to_tokens(reasoning_ids)
    number_token = [any(ch.isdigit() for ch in piece) for piece in pieces]
    # Two markers with nothing between them make one boundary, not two.
    boundaries = sorted(set(boundaries))
    return Reasoning(example_id, prompt_ids, reasoning_ids, boundaries, step_index, number_token)


def insert_comp(reasoning: Reasoning, boundaries: list[int], comp: CompTokens | None) -> EncodedSequence:
    """Build the sequence with a group of k `<COMP>` tokens after each boundary index.

    With `comp=None` or no boundaries the result is the plain uncompressed sequence.
    """
    cut = set(boundaries) if comp is not None else set()
    input_ids = list(reasoning.prompt_ids)
    labels = [IGNORE_INDEX] * len(input_ids)
    carried = [False] * len(input_ids)
    groups = 0
    for i, token in enumerate(reasoning.reasoning_ids):
        input_ids.append(token)
        labels.append(token)
        carried.append(reasoning.number_token[i] and reasoning.step_index[i] > 0)
        # A boundary on the final token would compress nothing that is ever read again.
        if i in cut and i < len(reasoning.reasoning_ids) - 1:
            input_ids.extend(comp.ids)
            labels.extend([IGNORE_INDEX] * comp.k)
            carried.extend([False] * comp.k)
            groups += 1
    return EncodedSequence(reasoning.id, input_ids, labels, len(reasoning.prompt_ids), carried, groups)


def pad_batch(sequences: list[EncodedSequence], pad_id: int, side: str = "right") -> dict[str, torch.Tensor]:
    """Pad a list of sequences into tensors: input_ids, attention_mask, labels, prompt_mask, carried."""
    width = max(len(s.input_ids) for s in sequences)
    batch = {name: [] for name in ("input_ids", "attention_mask", "labels", "prompt_mask", "carried")}
    for s in sequences:
        pad = width - len(s.input_ids)
        rows = {
            "input_ids": (s.input_ids, pad_id),
            "attention_mask": ([1] * len(s.input_ids), 0),
            "labels": (s.labels, IGNORE_INDEX),
            "prompt_mask": ([True] * s.prompt_length + [False] * (len(s.input_ids) - s.prompt_length), False),
            "carried": (s.carried, False),
        }
        for name, (values, fill) in rows.items():
            padded = values + [fill] * pad if side == "right" else [fill] * pad + values
            batch[name].append(padded)
    tensors = {name: torch.tensor(values) for name, values in batch.items()}
    tensors["prompt_mask"] = tensors["prompt_mask"].bool()
    tensors["carried"] = tensors["carried"].bool()
    return tensors
