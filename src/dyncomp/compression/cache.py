"""Compaction of a live `DynamicCache` for a batch whose rows compress at different steps.

Each layer of a `transformers` `DynamicCache` stores keys and values of shape
`(batch, kv_heads, seq, head_dim)`; here the `seq` axis contains L physical slots per row. A bool
tensor `valid` of shape `(batch, L)` marks the slots that hold a real token. Rows with fewer real
slots than L are padded with invalid slots on the left, so new tokens are appended on the right
for every row, and the attention mask for the next token is `valid` plus the token itself.

Positions are logical: rotary embeddings were applied to the cached keys before they were
cached, so moving a slot does not change what it encodes, and decoding passes explicit
position ids that count the tokens a row would have had without compression.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch


def cache_argument_name(model: torch.nn.Module) -> str:
    """Return the name of the cache argument of the model's forward.

    It is `cache` where the forward has such an argument (transformers 5.25 does), else the
    older `past_key_values`. A PEFT model is unwrapped to its base model, whose forward names it.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    parameters = inspect.signature(type(base).forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def _dynamic_layers(cache) -> list:
    layers = [layer for layer in cache.layers if getattr(layer, "is_initialized", False)]
    for layer in layers:
        if getattr(layer, "is_sliding", False) or not hasattr(layer, "keys"):
            raise TypeError(
                f"compaction needs full-attention DynamicLayer cache layers, got {type(layer).__name__}; "
                "create the cache with DynamicCache() and no config"
            )
    return layers


def compaction_index(valid: torch.Tensor, drop: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the gather index `(batch, new_L)` and the new `valid` `(batch, new_L)` of a compaction.

    Slots that are valid and not dropped keep their order and move to the right end of their
    row. `new_L` is the maximum kept count over rows, so the cache never stays as long as the
    longest uncompressed row. The left part of a shorter row points at leftover slots that the
    new `valid` marks invalid.
    """
    if valid.shape != drop.shape:
        raise ValueError(f"valid {tuple(valid.shape)} and drop {tuple(drop.shape)} must have the same (batch, L) shape")
    keep = valid & ~drop
    new_length = int(keep.sum(-1).max()) if keep.numel() else 0

    # A stable ascending sort puts a row's dropped slots first and its kept slots last, each in
    # their original order, so the last new_length entries are the row's kept slots, right-aligned.
    order = torch.sort(keep.to(torch.int8), dim=-1, stable=True).indices  # (batch, L)
    index = order[:, order.shape[1] - new_length :]  # (batch, new_L)
    return index, keep.gather(-1, index)


def _gather_seq(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    batch, heads, _, head_dim = tensor.shape
    expanded = index.to(tensor.device)[:, None, :, None].expand(batch, heads, index.shape[1], head_dim)
    return tensor.gather(2, expanded)  # (batch, kv_heads, new_L, head_dim)


def gather_slots(cache, index: torch.Tensor) -> None:
    """Replace every layer's keys and values by the slots that `index` `(batch, new_L)` selects, on the cache object."""
    for layer in _dynamic_layers(cache):
        layer.keys = _gather_seq(layer.keys, index)
        layer.values = _gather_seq(layer.values, index)


def compact(cache, valid: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """Remove the slots marked in `drop` `(batch, L)` from every layer of `cache` and return the new `valid`.

    The kept slots of each row move to the right end in their order, with one `gather` per
    key and value tensor, and L shrinks to the maximum kept count over rows. Invalid slots are
    removed as well, whether or not `drop` marks them.
    """
    index, new_valid = compaction_index(valid, drop)
    gather_slots(cache, index)
    return new_valid


def cache_bytes(cache) -> int:
    """Count the bytes of the key and value tensors of all layers, padding slots included."""
    total = 0
    for layer in cache.layers:
        if not getattr(layer, "is_initialized", False):
            continue
        for tensor in (layer.keys, layer.values):
            total += tensor.numel() * tensor.element_size()
    return total


def valid_bytes(cache, valid: torch.Tensor) -> torch.Tensor:
    """Count, per row, the key and value bytes of the valid slots over all layers; returns shape `(batch,)`."""
    slots = valid.sum(-1).long()
    total = torch.zeros_like(slots)
    for layer in cache.layers:
        if not getattr(layer, "is_initialized", False):
            continue
        for tensor in (layer.keys, layer.values):
            _, heads, _, head_dim = tensor.shape
            total += slots * heads * head_dim * tensor.element_size()
    return total


@dataclass
class SlotRoles:
    """The role of each cache slot, `(batch, L)` int8, kept aligned with the cache through appends and compactions.

    Roles are `EMPTY` (padding slot), `PROMPT`, `MEMORY` (a `<COMP>` slot, kept for good) and
    `STEP` (a token of the current step, dropped when the step is compressed). A `<COMP>` slot
    is `MEMORY` from the moment it is fed, because the later `<COMP>` tokens of its group and
    every later token attend to it.
    """

    roles: torch.Tensor

    EMPTY = 0
    PROMPT = 1
    MEMORY = 2
    STEP = 3

    @classmethod
    def empty(cls, batch: int, device: torch.device | str = "cpu") -> "SlotRoles":
        return cls(torch.zeros(batch, 0, dtype=torch.int8, device=device))

    @property
    def valid(self) -> torch.Tensor:
        return self.roles != self.EMPTY

    def append(self, new_roles: torch.Tensor) -> None:
        """Add the roles `(batch, n)` of n slots the model has just appended to the cache."""
        self.roles = torch.cat([self.roles, new_roles.to(self.roles)], dim=-1)  # (batch, L + n)

    def compact(self, cache, drop: torch.Tensor) -> None:
        """Compact `cache` as `compact` does and keep the roles aligned with it."""
        index, new_valid = compaction_index(self.valid, drop)
        gather_slots(cache, index)
        self.roles = torch.where(new_valid, self.roles.gather(-1, index), self.EMPTY)


def step_drop_mask(roles: SlotRoles, rows: torch.Tensor, keep_prompt: bool = True) -> torch.Tensor:
    """Return the `drop` mask `(batch, L)` for compressing the current step of the rows marked in `rows` `(batch,)`.

    The step's own slots go. With `keep_prompt=False` the prompt goes too except its first
    token, which only matters at a row's first compression since later ones find nothing more
    to drop.
    """
    drop = roles.roles == SlotRoles.STEP
    if not keep_prompt:
        is_prompt = roles.roles == SlotRoles.PROMPT
        drop = drop | (is_prompt & (is_prompt.long().cumsum(-1) > 1))
    return drop & rows.unsqueeze(-1)
