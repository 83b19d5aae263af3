"""Prepacked linear weights for batched CPU decoding: same outputs, scoped patching, stale copies refreshed."""

from __future__ import annotations

import pytest
import torch

from dyncomp.generation import packed
from dyncomp.generation.packed import PackedLinears

pytestmark = pytest.mark.skipif(not packed.packing_available(torch.nn.Linear(64, 64)), reason="this PyTorch has no MKL packed linear operators")


def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 64), torch.nn.Linear(64, 16, bias=False))


@pytest.fixture
def packed_calls(monkeypatch) -> list[int]:
    """Record the rows each packed product receives."""
    calls = []
    original = packed._run_packed

    def counting(x, weight_packed, weight, bias, rows):
        calls.append(x.numel() // x.shape[-1])
        return original(x, weight_packed, weight, bias, rows)

    monkeypatch.setattr(packed, "_run_packed", counting)
    return calls


@pytest.mark.parametrize("batch", [1, 3, 4, 16, 64, 65])
def test_packed_outputs_match_plain_linear(batch, packed_calls):
    model = small_model()
    x = torch.randn(batch, 1, 64)
    with torch.inference_mode():
        expected = model(x)
        with PackedLinears(model).active(batch):
            result = model(x)

    assert torch.allclose(result, expected, atol=1e-5)
    in_window = packed.MIN_ROWS <= batch <= packed.MAX_ROWS
    # Two layers are packed, and the 64x16 one keeps F.linear because a side is under MIN_SIDE.
    assert packed_calls == ([batch, batch] if in_window else [])


def test_other_row_counts_take_plain_path(packed_calls):
    model = small_model()
    prompt = torch.randn(8, 5, 64)  # a prompt's pass: 40 rows for a batch of 8
    with torch.inference_mode():
        expected = model(prompt)
        with PackedLinears(model).active(8):
            result = model(prompt)

    assert torch.equal(result, expected)
    assert packed_calls == []


def test_forward_restored_after_an_error():
    model = small_model()
    with pytest.raises(RuntimeError, match="stop"):
        with PackedLinears(model).active(8):
            assert "forward" in model[0].__dict__
            raise RuntimeError("stop")

    assert all("forward" not in module.__dict__ for module in model)


def test_changed_weight_packed_again():
    model = small_model()
    weights = PackedLinears(model)
    x = torch.randn(8, 64)
    with torch.inference_mode(), weights.active(8):
        model(x)
    with torch.no_grad():
        model[0].weight.mul_(2.0)

    with torch.inference_mode():
        expected = model(x)
        with weights.active(8):
            result = model(x)

    assert torch.allclose(result, expected, atol=1e-5)


def test_copies_kept_for_two_batch_sizes():
    model = small_model()
    weights = PackedLinears(model)
    for batch in (8, 16, 8, 32):
        with torch.inference_mode(), weights.active(batch):
            model(torch.randn(batch, 64))

    assert list(weights._sets) == [8, 32]


def test_gradients_take_the_plain_path(packed_calls):
    model = small_model()
    with PackedLinears(model).active(8):
        model(torch.randn(8, 64)).sum().backward()

    assert packed_calls == []
    assert model[0].weight.grad is not None


def test_off_for_float64():
    assert PackedLinears(small_model()).enabled
    assert not PackedLinears(small_model().double()).enabled


def test_off_when_memory_short(monkeypatch, packed_calls):
    monkeypatch.setattr(packed, "_available_bytes", lambda: 1024)
    model = small_model()
    with torch.inference_mode(), PackedLinears(model).active(8):
        model(torch.randn(8, 64))

    assert packed_calls == []


def test_failed_packing_falls_back(monkeypatch, packed_calls):
    def broken(weight, rows):
        raise RuntimeError("unknown operator")

    monkeypatch.setattr(torch.ops.mkl, "_mkl_reorder_linear_weight", broken)
    model = small_model()
    weights = PackedLinears(model)
    x = torch.randn(8, 64)
    with torch.inference_mode():
        expected = model(x)
        with weights.active(8):
            result = model(x)

    assert torch.equal(result, expected)
    assert packed_calls == []
    assert not weights.enabled
