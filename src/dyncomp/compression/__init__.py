"""Compression of the key/value cache at `<COMP>` tokens.

`masks` builds the attention mask that lets one parallel forward pass train what decoding
does, `lora` contains the LoRA adapter that is active only on `<COMP>` tokens, `cache` compacts a
live `DynamicCache` whose rows compress at different steps, and `recurrent` computes the same
logits both ways, for the parallel-equals-recurrent check.
"""

from dyncomp.compression.cache import (
    SlotRoles,
    allocated_bytes,
    bytes_per_slot,
    cache_argument_name,
    cache_bytes,
    compact,
    compaction_index,
    growing_cache,
    step_drop_mask,
    valid_bytes,
)
from dyncomp.compression.lora import (
    CompGate,
    CompressorConfig,
    attach_conditional_lora,
    comp_gate,
    load_compressor,
    save_compressor,
)
from dyncomp.compression.masks import Layout, build_compression_mask, logical_position_ids, segment_layout
from dyncomp.compression.recurrent import parallel_logits, recurrent_logits

__all__ = [
    "CompGate",
    "CompressorConfig",
    "Layout",
    "SlotRoles",
    "allocated_bytes",
    "attach_conditional_lora",
    "build_compression_mask",
    "bytes_per_slot",
    "cache_argument_name",
    "cache_bytes",
    "comp_gate",
    "compact",
    "compaction_index",
    "growing_cache",
    "load_compressor",
    "logical_position_ids",
    "parallel_logits",
    "recurrent_logits",
    "save_compressor",
    "segment_layout",
    "step_drop_mask",
    "valid_bytes",
]
