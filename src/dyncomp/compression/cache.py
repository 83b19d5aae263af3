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

from dyncomp.models.tokens import unwrap_peft


def _headroom(length: int) -> int:
    """Spare slots to allocate beyond `length`: a few steps' worth, at most an eighth more."""
    return max(32, length // 8)


class _SlotBuffer:
    """Keys or values of one layer in a tensor with spare slots, so an append writes in place.

    `view()` is the `(batch, kv_heads, length, head_dim)` part that contains tokens, from slot
    `start` of the `(batch, kv_heads, capacity, head_dim)` buffer. The rest of the buffer is
    allocated but unused: spare slots after the view, and before it the slots that a compaction
    cut from the left.
    """

    def __init__(self, tensor: torch.Tensor | None):
        self.buffer: torch.Tensor | None = None
        self.start = 0
        self.length = 0
        self.other = tensor  # anything that is not a 4D tensor (None, or the empty 1D tensor of a fresh layer)
        if tensor is not None and tensor.dim() == 4:
            self.assign(tensor)

    def view(self) -> torch.Tensor | None:
        if self.buffer is None:
            return self.other
        return self.buffer[:, :, self.start : self.start + self.length]

    def _allocate(self, like: torch.Tensor, length: int) -> None:
        batch, heads, _, head_dim = like.shape
        self.buffer = like.new_empty(batch, heads, length + _headroom(length), head_dim)

    def assign(self, tensor: torch.Tensor) -> None:
        """Hold `tensor` (batch, kv_heads, n, head_dim), reusing the buffer when its shape allows."""
        length = tensor.shape[2]
        buffer = self.buffer
        if buffer is not None and tensor.data_ptr() == self.view().data_ptr() and tensor.stride() == buffer.stride():
            self.length = length  # a leading slice of the view itself, as `crop` makes
            return
        fits = (
            buffer is not None
            and buffer.shape[0] == tensor.shape[0] and buffer.shape[1] == tensor.shape[1] and buffer.shape[3] == tensor.shape[3]
            and buffer.dtype == tensor.dtype and buffer.device == tensor.device
            and length <= buffer.shape[2] <= length + 2 * _headroom(length)
        )
        if not fits:
            self._allocate(tensor, length)
        elif tensor.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr():
            tensor = tensor.clone()  # another part of the buffer, which the copy below could overwrite while reading
        self.buffer[:, :, :length].copy_(tensor)
        self.start, self.length = 0, length

    def append(self, states: torch.Tensor) -> torch.Tensor:
        """Write `states` (batch, kv_heads, n, head_dim) after the held slots and return the new view."""
        if self.buffer is None:
            self.assign(states)
            return self.view()
        new_length = self.length + states.shape[2]
        if self.start + new_length > self.buffer.shape[2]:
            stored = self.view()
            self._allocate(stored, new_length)
            self.buffer[:, :, : self.length].copy_(stored)
            self.start = 0
        end = self.start + new_length
        self.buffer[:, :, end - states.shape[2] : end].copy_(states)
        self.length = new_length
        return self.view()

    def compact_rows(self, index: torch.Tensor, moved: torch.Tensor, shift: int) -> None:
        """Apply the compaction `index` `(batch, new_L)` in place, copying only the rows in `moved`.

        Every other row's `index` is `shift, ..., L - 1`, so for those rows dropping the first
        `shift` slots of the view is the whole compaction, and no data moves.
        """
        moved = moved.to(self.buffer.device)
        rows = None
        if moved.numel():
            rows = _gather_seq(self.view().index_select(0, moved), index.to(moved.device).index_select(0, moved))
        self.start += shift
        self.length = index.shape[1]
        if rows is not None:
            self.view().index_copy_(0, moved, rows)


def _set_slots(slots: _SlotBuffer | None, tensor: torch.Tensor | None) -> _SlotBuffer:
    """Store `tensor` in `slots` when both hold 4D tensors, else start a new `_SlotBuffer`."""
    if slots is None or slots.buffer is None or tensor is None or tensor.dim() != 4:
        return _SlotBuffer(tensor)
    slots.assign(tensor)
    return slots


def growing_cache():
    """Return an empty `DynamicCache` whose layers append in place instead of concatenating.

    A `DynamicLayer` copies its whole cache at every token (`torch.cat`). On 2 CPU cores this
    copy took more time than the matrix products of a batch-16 decoding step. The layers made
    here keep spare slots (see `_headroom`) and copy only when those run out. Everything else,
    including `layer.keys = tensor` as `gather_slots` does, behaves as in a `DynamicLayer`.
    """
    from transformers import DynamicCache

    cache = DynamicCache()
    if cache.layers or getattr(cache, "layer_class_to_replicate", None) is None:
        return cache  # This transformers version builds its layers another way, so keep them.
    cache.layer_class_to_replicate = _growing_layer_class()
    return cache


def _slots_property(attribute: str) -> property:
    """Build a `keys` or `values` property that reads and assigns through the `_SlotBuffer` in `attribute`."""

    def read(layer):
        slots = layer.__dict__.get(attribute)
        return slots.view() if slots is not None else None

    def assign(layer, tensor):
        layer.__dict__[attribute] = _set_slots(layer.__dict__.get(attribute), tensor)

    return property(read, assign)


_GROWING_LAYER = None


def _growing_layer_class():
    global _GROWING_LAYER
    if _GROWING_LAYER is not None:
        return _GROWING_LAYER
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        """A `DynamicLayer` whose keys and values live in `_SlotBuffer`s."""

        keys = _slots_property("_key_slots")
        values = _slots_property("_value_slots")

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            return self._key_slots.append(key_states), self._value_slots.append(value_states)

        def compact_rows(self, index, moved, shift):
            self._key_slots.compact_rows(index, moved, shift)
            self._value_slots.compact_rows(index, moved, shift)

        def allocated_bytes(self) -> int:
            total = 0
            for slots in (self._key_slots, self._value_slots):
                if slots.buffer is not None:
                    total += slots.buffer.numel() * slots.buffer.element_size()
            return total

    _GROWING_LAYER = GrowingLayer
    return GrowingLayer


def cache_argument_name(model: torch.nn.Module) -> str:
    """Return the name of the cache argument of the model's forward.

    It is `cache` where the forward has such an argument (transformers 5.25 does), else the
    older `past_key_values`. A PEFT model is unwrapped to its base model, whose forward names it.
    """
    base = unwrap_peft(model)
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
    """Replace every layer's keys and values by the slots that `index` `(batch, new_L)` selects, on the cache object.

    The layers of a `growing_cache` copy only the rows whose slots move. A row that keeps all
    its slots where they are (a row that did not compress, typically) costs nothing, which
    matters at batch 8 or 16, where rows compress at different steps.
    """
    layers = _dynamic_layers(cache)
    if not layers:
        return
    length = layers[0].keys.shape[2]
    shift = length - index.shape[1]
    in_place = (index == torch.arange(shift, length, device=index.device)).all(-1)  # (batch,)
    moved = (~in_place).nonzero().flatten()
    for layer in layers:
        if hasattr(layer, "compact_rows"):
            layer.compact_rows(index, moved, shift)
        else:
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


def bytes_per_slot(cache) -> int:
    """Key plus value bytes of one slot of one row, over all layers."""
    total = 0
    for layer in cache.layers:
        if not getattr(layer, "is_initialized", False):
            continue
        for tensor in (layer.keys, layer.values):
            _, heads, _, head_dim = tensor.shape
            total += heads * head_dim * tensor.element_size()
    return total


def valid_bytes(cache, valid: torch.Tensor) -> torch.Tensor:
    """Count, per row, the key and value bytes of the valid slots over all layers; returns shape `(batch,)`."""
    return valid.sum(-1).long() * bytes_per_slot(cache)


def allocated_bytes(cache) -> int:
    """Count the bytes the cache's layers have allocated, spare slots of a `growing_cache` included."""
    total = 0
    for layer in cache.layers:
        if hasattr(layer, "allocated_bytes"):
            total += layer.allocated_bytes()
        elif getattr(layer, "is_initialized", False):
            total += sum(tensor.numel() * tensor.element_size() for tensor in (layer.keys, layer.values))
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
