"""Linear layers through MKL with prepacked weights, for batched decoding on a CPU.

A decoding step multiplies one row per sequence of the batch by every weight matrix. The linear
layers of one SmolLM2-135M step (211 of them, weights read from memory) were timed on a 2-core
Xeon with AVX-512. With `F.linear` they took 47.8 ms at 8 rows and 51.2 ms at 16 rows. With
weights packed once for that row count (`torch.ops.mkl._mkl_reorder_linear_weight`) they took
31.4 ms and 36.9 ms. At 1 to 3 rows packing gained nothing. The packed layout depends on the row count, so a copy is made
per batch size, and the prompt's pass, whose row count differs, keeps `F.linear`.

PyTorch's own compiler packs weights this way on a CPU (inductor, with freezing). These two
operators are internal to PyTorch; where they are missing, decoding runs unchanged.
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

MIN_ROWS = 4
MAX_ROWS = 64
"""Batch sizes whose decoding steps use packed weights. The speeds above were measured from 4 to 64 rows."""

MIN_SIDE = 64
"""Weights with a side shorter than this (LoRA's low-rank factors) keep `F.linear`: packing them with oneDNN made a `<COMP>` step slower."""

KEPT_BATCH_SIZES = 2
"""Packed copies are kept for this many batch sizes, so alternating two sizes does not pack again each time."""

MEMORY_SHARE = 0.25
"""A copy is made only when it fits in this share of the memory still available."""


def packing_available(model: torch.nn.Module) -> bool:
    """Return True when `model` is float32 on a CPU and this PyTorch has MKL's packed linear operators."""
    parameter = next(model.parameters(), None)
    if parameter is None or parameter.device.type != "cpu" or parameter.dtype != torch.float32:
        return False
    if not torch.backends.mkl.is_available():
        return False
    return hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight") and hasattr(torch.ops.mkl, "_mkl_linear")


def _available_bytes() -> int | None:
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


class PackedLinears:
    """Packed copies of a model's large `nn.Linear` weights, one set per batch size, refreshed when a weight changes.

    A packed copy is keyed to its weight's storage and version counter. A weight changed in
    place is therefore packed again before it is used: PEFT merges and unmerges the `<COMP>`
    embedding rows into a tied output layer, and training may run between two generations.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.enabled = packing_available(model)
        self._sets: OrderedDict[int, dict[torch.nn.Linear, tuple[int, int, torch.Tensor]]] = OrderedDict()

    def _linears(self) -> list[torch.nn.Linear]:
        # Modules whose forward was already replaced on the instance (accelerate's offload hooks) are left alone.
        return [
            m for m in self.model.modules()
            if type(m) is torch.nn.Linear and "forward" not in m.__dict__ and min(m.weight.shape) >= MIN_SIDE
        ]

    def _fits_in_memory(self, modules: list[torch.nn.Linear]) -> bool:
        needed = sum(m.weight.numel() * m.weight.element_size() for m in modules)
        available = _available_bytes()
        if available is None or needed <= MEMORY_SHARE * available:
            return True
        logger.info(
            "decoding without packed weights: %.0f MiB of copies would exceed a quarter of the %.0f MiB available",
            needed / 2**20, available / 2**20,
        )
        return False

    def _packed_weight(self, packed_set: dict, module: torch.nn.Linear, rows: int) -> torch.Tensor:
        weight = module.weight
        key = (weight.data_ptr(), weight._version)
        entry = packed_set.get(module)
        if entry is None or entry[:2] != key:
            with torch.no_grad():
                entry = (*key, torch.ops.mkl._mkl_reorder_linear_weight(weight.detach(), rows))
            packed_set[module] = entry
        return entry[2]

    def _packed_set(self, rows: int, modules: list[torch.nn.Linear]) -> dict | None:
        if rows in self._sets:
            self._sets.move_to_end(rows)
            return self._sets[rows]
        if not self._fits_in_memory(modules):
            return None
        while len(self._sets) >= KEPT_BATCH_SIZES:
            self._sets.popitem(last=False)
        self._sets[rows] = {}
        return self._sets[rows]

    @contextlib.contextmanager
    def active(self, rows: int):
        """Route the model's large linear layers through weights packed for `rows` rows inside the block.

        Nothing changes when packing is unavailable or `rows` is outside `MIN_ROWS`..`MAX_ROWS`.
        """
        modules = self._linears() if self.enabled and MIN_ROWS <= rows <= MAX_ROWS else []
        packed_set = self._packed_set(rows, modules) if modules else None
        weights = []
        if packed_set is not None:
            try:
                weights = [self._packed_weight(packed_set, module, rows) for module in modules]
            except (RuntimeError, TypeError) as error:  # internal operators: another PyTorch may change or drop them
                logger.warning("decoding without packed weights: packing failed (%s)", error)
                self.enabled = False
                self._sets.clear()
                weights = []
        patched = []
        try:
            for module, weight in zip(modules, weights):
                module.forward = _packed_forward(module, weight, rows)
                patched.append(module)
            yield
        finally:
            for module in patched:
                del module.forward


def _run_packed(x: torch.Tensor, packed: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rows: int) -> torch.Tensor:
    return torch.ops.mkl._mkl_linear(x, packed, weight, bias, rows)


def _packed_forward(module: torch.nn.Linear, packed: torch.Tensor, rows: int):
    weight, bias = module.weight, module.bias

    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.numel() == rows * x.shape[-1] and x.dtype == torch.float32 and not torch.is_grad_enabled():
            return _run_packed(x, packed, weight, bias, rows)
        return F.linear(x, weight, bias)

    return forward
