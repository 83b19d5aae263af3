"""`newline`: compress after a token that contains a newline (`newline:blank` waits for a blank line)."""

import torch

from dyncomp.errors import UserError
from dyncomp.policies.base import DecodeState, Policy


class NewlinePolicy(Policy):
    name = "newline"

    def __init__(self, argument: str | None = None, min_step_tokens: int = 8):
        super().__init__(min_step_tokens)
        if argument not in (None, "blank"):
            raise UserError(f"invalid method 'newline:{argument}'; use 'newline' or 'newline:blank'")
        self.blank_line_only = argument == "blank"
        self._table: torch.Tensor | None = None

    def prepare(self, tokenizer, device="cpu") -> None:
        # One lookup table over the vocabulary, so deciding is a gather rather than a decode per row.
        # Decoding the whole vocabulary takes about a second, so the table is kept on the tokenizer.
        wanted = "\n\n" if self.blank_line_only else "\n"
        tables = tokenizer.__dict__.setdefault("_dyncomp_newline_tables", {})
        if (wanted, len(tokenizer)) not in tables:
            pieces = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
            tables[(wanted, len(tokenizer))] = torch.tensor([wanted in piece for piece in pieces], dtype=torch.bool)
        self._table = tables[(wanted, len(tokenizer))].to(device)

    def decide(self, state: DecodeState) -> torch.Tensor:
        assert self._table is not None, "prepare() must run before decide()"
        return self._table.to(state.last_tokens.device)[state.last_tokens]

    def spec(self) -> str:
        return "newline:blank" if self.blank_line_only else "newline"
