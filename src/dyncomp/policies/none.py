"""`none`: never compress (the uncompressed baseline)."""

import torch

from dyncomp.policies.base import DecodeState, Policy


class NonePolicy(Policy):
    name = "none"

    def decide(self, state: DecodeState) -> torch.Tensor:
        return torch.zeros_like(state.last_tokens, dtype=torch.bool)
