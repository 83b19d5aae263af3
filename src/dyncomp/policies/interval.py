"""`interval:N`: compress every N generated tokens."""

import torch

from dyncomp.errors import UserError
from dyncomp.policies.base import DecodeState, Policy


class IntervalPolicy(Policy):
    name = "interval"

    def __init__(self, argument: str | None = None, min_step_tokens: int = 8):
        super().__init__(min_step_tokens)
        try:
            self.interval = int(argument) if argument is not None else 0
        except ValueError:
            self.interval = 0
        if self.interval < 1:
            raise UserError(f"invalid method 'interval:{argument}'; give a positive token count, e.g. interval:32")

    def decide(self, state: DecodeState) -> torch.Tensor:
        return state.step_lengths >= self.interval

    def spec(self) -> str:
        return f"interval:{self.interval}"
