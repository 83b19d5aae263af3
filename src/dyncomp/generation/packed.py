"""Linear layers through oneDNN with prepacked weights, for batched decoding on a CPU.

A decoding step multiplies a few rows (the batch) by every weight matrix. Measured on a 2-core
Xeon with AVX-512, over SmolLM2-135M's 211 linear layers with weights read from memory, one
step took 45.5 ms at 8 rows and 51.2 ms at 16 rows with `F.linear` (MKL), and 33.4 ms and
41.3 ms with weights packed once by `torch.ops.mkldnn._reorder_linear_weight`. At 1 to 3 rows,
and for the prompt's pass, `F.linear` was faster, so packed weights are used only inside that
window, decided per call.

PyTorch's own compiler packs weights this way on a CPU (inductor, with freezing). These two
operators are internal to PyTorch; where they are missing, decoding runs unchanged.
"""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

MIN_ROWS = 4
MAX_ROWS = 32
"""Rows per call (batch times tokens) for which packed weights beat `F.linear` on the CPU measured above."""

MIN_SIDE = 64
"""Weights with a side shorter than this (LoRA's low-rank factors) keep `F.linear`: packing made them slower."""

MEMORY_SHARE = 0.25
"""Packed copies are made only when they fit in this share of the memory still available."""


def packing_available(model: torch.nn.Module) -> bool:
    """True when `model` is float32 on a CPU and this PyTorch has the oneDNN linear operators."""
    parameter = next(model.parameters(), None)
    if parameter is None or parameter.device.type != "cpu" or parameter.dtype != torch.float32:
        return False
    if not torch.backends.mkldnn.is_available():
        return False
    return hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _available_bytes() -> int | None:
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


class PackedLinears:
    """Packed copies of a model's `nn.Linear` weights, made once and refreshed when a weight changes.

    A packed copy is keyed to its weight's storage and version counter. A weight changed in
    place is therefore packed again before it is used: PEFT merges and unmerges the `<COMP>`
    embedding rows into a tied output layer, and training may run between two generations.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self._packed: dict[torch.nn.Linear, tuple[int, int, torch.Tensor]] = {}
        self.enabled = packing_available(model)
        if self.enabled:
            needed = sum(m.weight.numel() * m.weight.element_size() for m in self._linears())
            available = _available_bytes()
            if available is not None and needed > MEMORY_SHARE * available:
                logger.info(
                    "decoding without packed weights: %.0f MiB of copies would exceed a quarter of the %.0f MiB available",
                    needed / 2**20, available / 2**20,
                )
                self.enabled = False

    def _linears(self) -> list[torch.nn.Linear]:
        # Modules whose forward was already replaced on the instance (accelerate's offload hooks) are left alone.
        return [
            m for m in self.model.modules()
            if type(m) is torch.nn.Linear and "forward" not in m.__dict__ and min(m.weight.shape) >= MIN_SIDE
        ]

    def _packed_weight(self, module: torch.nn.Linear) -> torch.Tensor:
        weight = module.weight
        key = (weight.data_ptr(), weight._version)
        entry = self._packed.get(module)
        if entry is None or entry[:2] != key:
            with torch.no_grad():
                packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), MIN_ROWS * 2)
            entry = (*key, packed)
            self._packed[module] = entry
        return entry[2]

    @contextlib.contextmanager
    def active(self):
        """Route the model's linear layers through the packed weights inside the block, when packing is available."""
        if not self.enabled:
            yield
            return
        patched = []
        try:
            for module in self._linears():
                module.forward = _packed_forward(module, self._packed_weight(module))
                patched.append(module)
            yield
        finally:
            for module in patched:
                del module.forward


def _run_packed(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def _packed_forward(module: torch.nn.Linear, packed: torch.Tensor):
    weight, bias = module.weight, module.bias

    def forward(x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if MIN_ROWS <= rows <= MAX_ROWS and x.dtype == torch.float32 and not torch.is_grad_enabled():
            return _run_packed(x, packed, bias)
        return F.linear(x, weight, bias)

    return forward
