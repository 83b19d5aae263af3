"""Compaction and byte counting on hand-made `DynamicCache` objects."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from dyncomp.compression.cache import SlotRoles, cache_bytes, compact, step_drop_mask, valid_bytes

LAYERS, BATCH, HEADS, SLOTS, HEAD_DIM = 2, 3, 2, 5, 4


def numbered_cache() -> DynamicCache:
    """A cache whose key entries equal `100 * layer + 10 * row + slot`, and values the negative of that."""
    layers = []
    for layer in range(LAYERS):
        codes = 100 * layer + 10 * torch.arange(BATCH)[:, None] + torch.arange(SLOTS)[None, :]  # (batch, slots)
        keys = codes[:, None, :, None].expand(BATCH, HEADS, SLOTS, HEAD_DIM).float().contiguous()
        layers.append((keys, -keys))
    return DynamicCache(ddp_cache_data=layers)


def slot_codes(tensor: torch.Tensor, row: int) -> list[int]:
    """The slot codes of one row, read from head 0 and checked equal on every head and channel."""
    values = tensor[row]  # (kv_heads, seq, head_dim)
    assert torch.equal(values, values[:1, :, :1].expand_as(values))
    return [int(v) for v in values[0, :, 0]]


def test_compact_keeps_order_and_shrinks_to_max_kept():
    cache = numbered_cache()
    layers_before = list(cache.layers)
    valid = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    drop = torch.tensor([[0, 1, 0, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)

    new_valid = compact(cache, valid, drop)

    assert new_valid.tolist() == [[True] * 4, [False, True, True, True], [False, False, False, True]]
    assert cache.get_seq_length() == 4
    assert cache.layers == layers_before
    for layer in range(LAYERS):
        keys, values = cache.layers[layer].keys, cache.layers[layer].values
        assert keys.shape == (BATCH, HEADS, 4, HEAD_DIM)
        assert slot_codes(keys, 0) == [100 * layer + s for s in (0, 2, 3, 4)]
        assert slot_codes(keys, 1)[1:] == [100 * layer + 10 + s for s in (2, 3, 4)]
        assert slot_codes(keys, 2)[3:] == [100 * layer + 24]
        assert slot_codes(values, 0) == [-(100 * layer + s) for s in (0, 2, 3, 4)]


def test_compact_removes_padding_slots_without_drop():
    cache = numbered_cache()
    valid = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 1, 1], [0, 0, 0, 1, 1]], dtype=torch.bool)

    new_valid = compact(cache, valid, torch.zeros_like(valid))

    assert cache.get_seq_length() == 4
    assert new_valid.sum(-1).tolist() == [3, 4, 2]
    assert slot_codes(cache.layers[0].keys, 1) == [11, 12, 13, 14]


def test_cache_bytes_counts_all_key_and_value_tensors():
    cache = numbered_cache()
    expected = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert cache_bytes(cache) == expected
    assert cache_bytes(cache) == LAYERS * 2 * BATCH * HEADS * SLOTS * HEAD_DIM * 4


def test_valid_bytes_counts_valid_slots_per_row():
    cache = numbered_cache()
    valid = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [0, 0, 0, 0, 1]], dtype=torch.bool)
    per_slot = LAYERS * 2 * HEADS * HEAD_DIM * 4
    assert valid_bytes(cache, valid).tolist() == [5 * per_slot, 3 * per_slot, 1 * per_slot]
    assert int(valid_bytes(cache, torch.ones(BATCH, SLOTS, dtype=torch.bool)).sum()) == cache_bytes(cache)


def test_step_drop_mask_drops_step_of_selected_rows():
    P, M, S, E = SlotRoles.PROMPT, SlotRoles.MEMORY, SlotRoles.STEP, SlotRoles.EMPTY
    roles = SlotRoles(torch.tensor([[P, P, M, S, S], [E, P, P, S, M]], dtype=torch.int8))
    both = torch.tensor([True, True])

    assert step_drop_mask(roles, both).int().tolist() == [[0, 0, 0, 1, 1], [0, 0, 0, 1, 0]]
    assert step_drop_mask(roles, torch.tensor([False, True])).int().tolist() == [[0, 0, 0, 0, 0], [0, 0, 0, 1, 0]]
    assert step_drop_mask(roles, both, keep_prompt=False).int().tolist() == [[0, 1, 0, 1, 1], [0, 0, 1, 1, 0]]


def test_slot_roles_follow_compaction():
    P, M, S, E = SlotRoles.PROMPT, SlotRoles.MEMORY, SlotRoles.STEP, SlotRoles.EMPTY
    cache = numbered_cache()
    roles = SlotRoles(torch.tensor([[P, S, S, S, M], [E, E, P, S, S], [P, P, S, M, S]], dtype=torch.int8))
    compressing = torch.tensor([True, False, True])

    roles.compact(cache, step_drop_mask(roles, compressing))

    assert roles.roles.tolist() == [[E, P, M], [P, S, S], [P, P, M]]
    assert slot_codes(cache.layers[0].keys, 0)[1:] == [0, 4]
    assert slot_codes(cache.layers[0].keys, 1) == [12, 13, 14]
    assert slot_codes(cache.layers[0].keys, 2) == [20, 21, 23]


def test_growing_cache_matches_dynamic_cache():
    from conftest import make_tiny_model
    from dyncomp.compression.cache import allocated_bytes, cache_argument_name, growing_cache

    model = make_tiny_model("llama")
    name = cache_argument_name(model)
    torch.manual_seed(1)
    ids = torch.randint(3, 256, (2, 40))
    plain, growing = DynamicCache(), growing_cache()
    with torch.inference_mode():
        first = model(input_ids=ids[:, :8], use_cache=True, **{name: plain}).logits
        second = model(input_ids=ids[:, :8], use_cache=True, **{name: growing}).logits
        assert torch.equal(first, second)
        for t in range(8, 40):  # past the first headroom of 32 spare slots, so the buffer grows once
            a = model(input_ids=ids[:, t : t + 1], use_cache=True, **{name: plain}).logits
            b = model(input_ids=ids[:, t : t + 1], use_cache=True, **{name: growing}).logits
            assert torch.allclose(a, b, atol=1e-6, rtol=0)
    for plain_layer, growing_layer in zip(plain.layers, growing.layers):
        assert torch.equal(plain_layer.keys, growing_layer.keys)
        assert torch.equal(plain_layer.values, growing_layer.values)
    assert growing.get_seq_length() == 40
    assert cache_bytes(growing) <= allocated_bytes(growing) <= cache_bytes(growing) * (40 + 32) // 40


def test_growing_cache_compacts_in_place_and_crops():
    from dyncomp.compression.cache import growing_cache

    cache = growing_cache()
    reference = numbered_cache()
    for index, layer in enumerate(reference.layers):
        cache.update(layer.keys.clone(), layer.values.clone(), index)
    buffer_before = cache.layers[0]._key_slots.buffer.data_ptr()
    valid = torch.ones(BATCH, SLOTS, dtype=torch.bool)
    drop = torch.tensor([[0, 1, 0, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)

    compact(cache, valid, drop)
    compact(reference, valid, drop)

    assert cache.layers[0]._key_slots.buffer.data_ptr() == buffer_before
    for growing_layer, plain_layer in zip(cache.layers, reference.layers):
        assert torch.equal(growing_layer.keys, plain_layer.keys)
        assert torch.equal(growing_layer.values, plain_layer.values)
    cache.crop(-1)
    assert cache.get_seq_length() == 4
    assert slot_codes(cache.layers[1].keys, 1) == [110, 111, 112, 113]
    cache.update(torch.zeros(BATCH, HEADS, 1, HEAD_DIM), torch.zeros(BATCH, HEADS, 1, HEAD_DIM), 0)
    assert cache.layers[0].keys.shape[2] == 5
    assert float(cache.layers[0].keys[:, :, -1].abs().sum()) == 0.0


def test_growing_cache_moves_only_compressed_rows():
    from dyncomp.compression.cache import growing_cache

    cache = growing_cache()
    reference = numbered_cache()
    for index, layer in enumerate(reference.layers):
        cache.update(layer.keys.clone(), layer.values.clone(), index)
    slots = cache.layers[0]._key_slots
    buffer_before = slots.buffer.data_ptr()
    # Row 0 is left-padded and keeps its tokens. Row 1 is the longest and compresses. Row 2
    # ends in a padding slot, as a finished row does, so its tokens must move right.
    valid = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 1, 0]], dtype=torch.bool)
    drop = torch.tensor([[0, 0, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)

    new_valid = compact(cache, valid, drop)
    compact(reference, valid, drop)

    assert slots.buffer.data_ptr() == buffer_before
    assert slots.start == 1
    assert slots.length == 4
    assert new_valid.tolist() == [[False, True, True, True], [False, True, True, True], [True, True, True, True]]
    for growing_layer, plain_layer in zip(cache.layers, reference.layers):
        for growing_tensor, plain_tensor in ((growing_layer.keys, plain_layer.keys), (growing_layer.values, plain_layer.values)):
            assert torch.equal(growing_tensor[new_valid[:, None, :, None].expand_as(growing_tensor)],
                               plain_tensor[new_valid[:, None, :, None].expand_as(plain_tensor)])
    assert slot_codes(cache.layers[1].keys, 0)[1:] == [102, 103, 104]
    assert slot_codes(cache.layers[1].keys, 1)[1:] == [110, 113, 114]
    assert slot_codes(cache.layers[1].keys, 2) == [120, 121, 122, 123]

    # Appending past the spare slots moves the stored slots to the front of a new buffer.
    for step in range(40):
        code = torch.full((BATCH, HEADS, 1, HEAD_DIM), 1000.0 + step)
        cache.update(code, -code, 0)
    assert slots.start == 0
    assert cache.layers[0].keys.shape[2] == 44
    assert slot_codes(cache.layers[0].keys, 2)[:5] == [20, 21, 22, 23, 1000]
