"""`oracle`: compress where the annotation puts `<COMP>` (teacher-forced scoring only)."""

import torch

from dyncomp.errors import UserError
from dyncomp.policies.base import DecodeState, Policy


class OraclePolicy(Policy):
    name = "oracle"
    teacher_forced_only = True

    def decide(self, state: DecodeState) -> torch.Tensor:
        raise UserError("the 'oracle' method reads annotated markers, so it works only with 'dyncomp score', not in generation")
