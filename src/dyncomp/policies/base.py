"""The policy interface: decide, per sequence and per step, whether to insert `<COMP>`."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DecodeState:
    """What a policy sees after each generated token, for every row of the batch at once."""

    last_tokens: torch.Tensor
    """(batch,) the token just generated."""
    step_lengths: torch.Tensor
    """(batch,) tokens generated since the last `<COMP>` group (or since the reasoning began)."""
    hidden: torch.Tensor | None = None
    """(batch, hidden) the final-norm hidden state of `last_tokens`, for learned policies."""


class Policy:
    """Base class. Subclasses set `name` and override `decide`; the decoding loop calls `should_compress`.

    A policy must not look at which other policies exist, and the decoding loop must not
    look at which policy it holds: adding a policy is adding a file and registering it.
    """

    name: str = ""
    needs_hidden: bool = False
    """True when `decide` reads `DecodeState.hidden`, so the engine captures it."""
    teacher_forced_only: bool = False
    """True for policies that read annotations and so cannot drive free generation."""

    def __init__(self, min_step_tokens: int = 8):
        self.min_step_tokens = min_step_tokens

    def prepare(self, tokenizer, device: torch.device | str = "cpu") -> None:
        """Precompute whatever `decide` needs from the tokenizer (called once before decoding)."""

    def decide(self, state: DecodeState) -> torch.Tensor:
        """Return a bool tensor (batch,): True where the step just finished."""
        raise NotImplementedError

    def should_compress(self, state: DecodeState) -> torch.Tensor:
        # Very short steps cost a whole extra forward pass for almost no saved memory.
        return self.decide(state) & (state.step_lengths >= self.min_step_tokens)

    def spec(self) -> str:
        """The method string this policy was made from, e.g. 'interval:32'."""
        return self.name
