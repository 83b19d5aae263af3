"""Batched decoding in which each row compresses its own cache when its policy fires.

Cache layout, per row: `[prompt | memory | current step]`, held in a `DynamicCache` whose
tensors are `(batch, kv_heads, L, head_dim)`; `SlotRoles` marks each of the L slots as prompt,
memory (`<COMP>`), current step or empty (padding, or a slot a finished row did not fill).

A `<COMP>` is not given an extra forward pass. When a row's policy fires after token t, that
row feeds `<COMP>` in the next batched forward pass instead of a sampled token, while the
other rows feed their next tokens as usual. The logits at `<COMP>` then predict token t+1,
exactly as in training, where the token after a `<COMP>` group is predicted from its last
`<COMP>`. Right after a row's last `<COMP>` is in the cache, the row's finished step leaves it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from dyncomp.classifier.features import FinalNormCapture
from dyncomp.compression.cache import (
    SlotRoles,
    allocated_bytes,
    bytes_per_slot,
    cache_argument_name,
    cache_bytes,
    growing_cache,
    step_drop_mask,
)
from dyncomp.errors import UserError
from dyncomp.generation.packed import PackedLinears
from dyncomp.models.tokens import CompTokens, unwrap_peft
from dyncomp.policies.base import DecodeState, Policy

logger = logging.getLogger(__name__)


@dataclass
class DecodingConfig:
    """Settings of one generation run; the CLI takes its defaults from here."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop_strings: tuple[str, ...] = ()
    ignore_eos: bool = False
    """Keep generating after the end-of-sequence token (benchmarks force a length this way)."""
    keep_prompt: bool = True


@dataclass
class SequenceResult:
    """The output of one row, with its memory and cost counted."""

    token_ids: list[int] = field(default_factory=list)
    """Generated ids in order, `<COMP>` ids included."""
    text: str = ""
    """The generated text with `<COMP>` marks where the row compressed."""
    n_generated: int = 0
    """Generated tokens, `<COMP>` excluded."""
    n_comp: int = 0
    """Compressions (groups of k `<COMP>` tokens)."""
    comp_after: list[int] = field(default_factory=list)
    """For each compression, the number of generated tokens before it."""
    prompt_tokens: int = 0
    kv_bytes_peak: int = 0
    kv_bytes_final: int = 0
    kv_bytes_full: int = 0
    """Bytes an uncompressed cache would hold for the same prompt and generated tokens."""
    dependency: int = 0
    """Sum over generated tokens of the number of cache entries the token attended to."""
    stop_reason: str = "length"


@dataclass
class BatchStats:
    """Time and memory of one `generate` call, for the whole batch."""

    decode_seconds: float = 0.0
    """Wall time after the prompt's forward pass."""
    policy_seconds: float = 0.0
    prefill_seconds: float = 0.0
    forward_passes: int = 0
    physical_peak_bytes: int = 0
    """Largest key and value bytes the batch's cache held, padding slots included."""
    allocated_peak_bytes: int = 0
    """Largest bytes the cache had allocated: `physical_peak_bytes` plus the spare slots it appends into."""
    memory_trace: list[tuple[list[int], int]] = field(default_factory=list)
    """With `trace_memory`, per forward pass: each row's counted bytes and the cache's tensor bytes."""


@contextlib.contextmanager
def decoding_attention(model: torch.nn.Module):
    """Run the model under PyTorch's fused attention (`sdpa`) while decoding, when it was loaded with `eager`.

    Models load with eager attention because training applies custom 4D masks. Decoding only
    passes padding masks, and eager attention copies every cached key and value once per layer
    and step to repeat them over the query heads, which costs as much as the matrix products
    at batch 16 on a CPU. Both implementations pass the invariant tests.
    """
    base = unwrap_peft(model)
    current = getattr(base.config, "_attn_implementation", None)
    if current != "eager" or not hasattr(base, "set_attn_implementation"):
        yield
        return
    base.set_attn_implementation("sdpa")
    try:
        yield
    finally:
        base.set_attn_implementation(current)


def _select_tokens(logits: torch.Tensor, config: DecodingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """Choose each row's next token from its last logits (batch, vocab) -> (batch,)."""
    if config.temperature <= 0:
        return logits.argmax(dim=-1)
    probabilities = torch.softmax(logits.float() / config.temperature, dim=-1)
    if config.top_p < 1.0:
        sorted_probs, sorted_ids = probabilities.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p; the first token always stays.
        outside = sorted_probs.cumsum(-1) - sorted_probs > config.top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probabilities = torch.zeros_like(probabilities).scatter(-1, sorted_ids, sorted_probs)
    return torch.multinomial(probabilities, 1, generator=generator).squeeze(-1)


class CompressingEngine:
    """Generate for a batch of prompts, compressing each row where its policy fires."""

    def __init__(self, model: torch.nn.Module, tokenizer, comp: CompTokens | None, trace_memory: bool = False, packed_weights: bool = True):
        self.model = model
        self.packed_weights = packed_weights
        """On a CPU in float32, decode batches of 4 to 64 rows with prepacked weights (`dyncomp.generation.packed`)."""
        self._packed: PackedLinears | None = None
        self.trace_memory = trace_memory
        self.tokenizer = tokenizer
        self.comp = comp
        self.cache_argument = cache_argument_name(model)
        self._decoder: tuple[torch.nn.Module, str] | None = None
        """The decoder stack without the language-model head, and its cache argument's name."""
        self.device = next(model.parameters()).device
        eos = tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        generation_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        if generation_eos is not None:
            self.eos_ids |= set(generation_eos if isinstance(generation_eos, list) else [generation_eos])
        self.last_stats = BatchStats()
        self.current_row_bytes: list[int] = []
        """Each row's key and value bytes after the latest forward pass, for streaming displays."""

    def _check_length(self, prompt_tokens: int, new_tokens: int) -> None:
        config = self.model.config.get_text_config() if hasattr(self.model.config, "get_text_config") else self.model.config
        limit = getattr(config, "max_position_embeddings", None)
        if limit is not None and prompt_tokens + new_tokens > limit:
            raise UserError(
                f"a prompt of {prompt_tokens} tokens plus {new_tokens} new tokens exceeds the model's {limit} positions; "
                "lower --max-new-tokens or shorten the prompt"
            )

    def prepare_batch_size(self, batch: int) -> None:
        """Make the packed weight copies for `batch` rows now, so the first generation at that size does not pay for them."""
        with self._linear_kernels(batch):
            pass

    def _linear_kernels(self, batch: int):
        if not self.packed_weights:
            return contextlib.nullcontext()
        if self._packed is None:  # made on first use and kept, so later batches of the same size reuse the copies
            self._packed = PackedLinears(self.model)
        return self._packed.active(batch)

    def _forward(self, cache, **inputs):
        inputs[self.cache_argument] = cache
        return self.model(use_cache=True, **inputs)

    def _forward_without_head(self, cache, **inputs):
        """Run the decoder stack only: teacher-forced decoding needs no logits after the prompt."""
        if self._decoder is None:  # found once, because `cache_argument_name` inspects a signature
            decoder = unwrap_peft(self.model).get_decoder()
            self._decoder = (decoder, cache_argument_name(decoder))
        decoder, cache_argument = self._decoder
        inputs[cache_argument] = cache
        return decoder(use_cache=True, **inputs)

    @torch.inference_mode()
    def generate(
        self,
        prompts: list[str] | list[list[int]],
        policy: Policy,
        config: DecodingConfig | None = None,
        on_token: Callable[[int, int, bool], None] | None = None,
        forced: list[list[int]] | None = None,
    ) -> list[SequenceResult]:
        """Decode every prompt to completion; `on_token(row, token_id, is_comp)` streams output.

        With `forced`, row i feeds the tokens `forced[i]` instead of sampling (teacher forcing),
        while its policy still decides where to compress; the row ends after its last forced token.
        """
        config = config or DecodingConfig()
        if policy.teacher_forced_only:
            raise ValueError(f"policy '{policy.spec()}' works only teacher-forced")
        if self.comp is None and policy.name != "none":
            raise ValueError(f"policy '{policy.spec()}' needs a model with <COMP> tokens and a compressor")
        policy.prepare(self.tokenizer, self.device)
        generator = torch.Generator(device=self.device).manual_seed(config.seed) if config.temperature > 0 else None
        stats = BatchStats()
        started = time.perf_counter()

        if prompts and not isinstance(prompts[0], str):
            encoded = self.tokenizer.pad({"input_ids": [list(p) for p in prompts]}, return_tensors="pt").to(self.device)
        else:
            encoded = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        attention = encoded["attention_mask"].bool()  # (batch, prompt_len)
        self._check_length(int(attention.sum(-1).max()), max(map(len, forced)) if forced else config.max_new_tokens)
        cache = growing_cache()
        roles = SlotRoles(torch.where(attention, SlotRoles.PROMPT, SlotRoles.EMPTY).to(torch.int8))
        positions = (attention.long().cumsum(-1) - 1).clamp(min=0)

        # The hidden state a classifier reads is a by-product of the pass that predicts the next token.
        capture = FinalNormCapture(self.model) if policy.needs_hidden else None
        with decoding_attention(self.model), self._linear_kernels(attention.shape[0]), capture if capture is not None else contextlib.nullcontext():
            output = self._forward(cache, input_ids=encoded["input_ids"], attention_mask=attention.long(), position_ids=positions, logits_to_keep=1)
            stats.prefill_seconds = time.perf_counter() - started
            stats.forward_passes += 1
            results = self._decode(cache, roles, output, capture, attention, policy, config, generator, on_token, stats, forced)

        stats.decode_seconds = time.perf_counter() - started - stats.prefill_seconds
        self.last_stats = stats
        return results

    def _decode(self, cache, roles, output, capture, attention, policy, config, generator, on_token, stats, forced):
        batch = attention.shape[0]
        device = self.device
        k = self.comp.k if self.comp is not None else 0
        comp_ids = torch.tensor(self.comp.ids if self.comp is not None else [0], device=device)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        eos_ids = torch.tensor(sorted(self.eos_ids) or [-1], device=device)

        results = [SequenceResult(prompt_tokens=int(n)) for n in attention.sum(-1)]
        next_position = attention.long().sum(-1)  # (batch,) logical position of the next fed token
        step_lengths = torch.zeros(batch, dtype=torch.long, device=device)
        comp_pending = torch.zeros(batch, dtype=torch.long, device=device)  # <COMP> tokens still to feed
        generated = torch.zeros(batch, dtype=torch.long, device=device)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        dependency = torch.zeros(batch, dtype=torch.long, device=device)
        peak_slots = torch.zeros(batch, dtype=torch.long, device=device)
        slot_bytes = None
        logits = output.logits[:, -1]  # (batch, vocab)
        forced_ids = forced_lengths = None
        forward = self._forward
        if forced is not None:
            forward = self._forward_without_head
            forced_lengths = torch.tensor([len(row) for row in forced], device=device)
            width = max(int(forced_lengths.max()), 1)
            forced_ids = torch.tensor([row + [pad_id] * (width - len(row)) for row in forced], device=device)  # (batch, width)
            config = dataclasses.replace(config, max_new_tokens=width, ignore_eos=True, stop_strings=())

        while True:
            feeding_comp = comp_pending > 0
            if self.comp is not None:
                # Only a policy inserts <COMP>; the language-model head must not pick it as text.
                logits = logits.index_fill(-1, comp_ids, torch.finfo(logits.dtype).min)
            if forced_ids is None:
                sampled = _select_tokens(logits, config, generator)
            else:
                sampled = forced_ids.gather(1, generated.clamp(max=forced_ids.shape[1] - 1)[:, None]).squeeze(1)
            comp_token = comp_ids[(k - comp_pending).clamp(min=0, max=max(k - 1, 0))]
            tokens = torch.where(feeding_comp, comp_token, sampled)
            emits = ~finished & ~feeding_comp
            generated += emits.long()
            self._record(results, tokens, emits, feeding_comp & ~finished, on_token)

            hit_eos = emits & torch.isin(sampled, eos_ids) if not config.ignore_eos else torch.zeros_like(emits)
            hit_stop = self._stop_string_hits(results, emits, config)
            limit = forced_lengths if forced_lengths is not None else config.max_new_tokens
            hit_length = emits & (generated >= limit)
            newly_done = hit_eos | hit_stop | hit_length
            for row in newly_done.nonzero().flatten().tolist():
                if hit_eos[row]:
                    results[row].stop_reason = "eos"
                elif hit_stop[row]:
                    results[row].stop_reason = "stop"
                else:
                    results[row].stop_reason = "length"
            finished |= newly_done
            if bool(finished.all()):
                break

            # Finished rows feed padding into a slot marked empty, which the next compaction removes.
            fed = ~finished
            tokens = torch.where(fed, tokens, torch.full_like(tokens, pad_id))
            valid = roles.valid
            attended = valid.sum(-1) + 1  # (batch,)
            mask = torch.cat([valid, fed[:, None]], dim=-1).long()  # (batch, L + 1)
            output = forward(cache, input_ids=tokens[:, None], attention_mask=mask, position_ids=next_position[:, None])
            stats.forward_passes += 1
            new_roles = torch.where(feeding_comp, SlotRoles.MEMORY, SlotRoles.STEP)
            roles.append(torch.where(fed, new_roles, SlotRoles.EMPTY).to(torch.int8)[:, None])
            next_position += fed.long()
            dependency += torch.where(fed & ~feeding_comp, attended, 0)

            # The peak is read before compaction: the finished step and its <COMP> are both held then.
            if slot_bytes is None:
                slot_bytes = bytes_per_slot(cache)
            peak_slots = self._count_memory(peak_slots, roles, fed, slot_bytes, stats, cache)
            comp_pending = torch.where(feeding_comp & fed, comp_pending - 1, comp_pending)
            group_done = feeding_comp & fed & (comp_pending == 0)
            if bool(group_done.any()):
                roles.compact(cache, step_drop_mask(roles, group_done, config.keep_prompt))

            step_lengths = torch.where(feeding_comp, torch.zeros_like(step_lengths), step_lengths + fed.long())
            hidden = capture.output[:, -1] if capture is not None else None  # (batch, hidden)
            policy_started = time.perf_counter()
            decide = policy.should_compress(DecodeState(last_tokens=tokens, step_lengths=step_lengths, hidden=hidden))
            stats.policy_seconds += time.perf_counter() - policy_started
            start_group = decide & fed & ~feeding_comp & (generated < limit)
            comp_pending = torch.where(start_group, torch.full_like(comp_pending, k), comp_pending)
            logits = output.logits[:, -1] if forced_ids is None else logits

        for result, row_dependency, row_peak in zip(results, dependency.tolist(), peak_slots.tolist()):
            result.dependency = row_dependency
            result.kv_bytes_peak = row_peak * (slot_bytes or 0)
        self._finish(results, slot_bytes or bytes_per_slot(cache), roles)
        return results

    def _record(self, results, tokens, emits, comps, on_token) -> None:
        comp_ids = self.comp.ids if self.comp is not None else ()
        token_list, comp_list = tokens.tolist(), comps.tolist()
        for row in (emits | comps).nonzero().flatten().tolist():
            token, is_comp = token_list[row], comp_list[row]
            result = results[row]
            if not is_comp:
                result.n_generated += 1
            elif not result.token_ids or result.token_ids[-1] not in comp_ids:
                result.n_comp += 1
                result.comp_after.append(result.n_generated)
            result.token_ids.append(token)
            if on_token is not None:
                on_token(row, token, is_comp)

    def _stop_string_hits(self, results, emits, config) -> torch.Tensor:
        hits = torch.zeros_like(emits)
        if not config.stop_strings:
            return hits
        longest = max(len(s) for s in config.stop_strings)
        for row in emits.nonzero().flatten().tolist():
            tail = self.tokenizer.decode(results[row].token_ids[-(longest + 2):], skip_special_tokens=True)
            if any(stop in tail for stop in config.stop_strings):
                hits[row] = True
                results[row].stop_reason = "stop"
        return hits

    def _count_memory(self, peak_slots, roles, fed, slot_bytes: int, stats, cache) -> torch.Tensor:
        """Update the batch's peaks after a forward pass and return each row's peak slot count `(batch,)`."""
        # Counted from the slots each row really holds, not from token counts.
        row_slots = roles.valid.sum(-1)
        row_bytes = (row_slots * slot_bytes).tolist()
        self.current_row_bytes = row_bytes
        stats.physical_peak_bytes = max(stats.physical_peak_bytes, roles.roles.shape[1] * slot_bytes)
        stats.allocated_peak_bytes = max(stats.allocated_peak_bytes, allocated_bytes(cache))
        if self.trace_memory:
            stats.memory_trace.append((row_bytes, cache_bytes(cache)))
        return torch.where(fed, torch.maximum(peak_slots, row_slots), peak_slots)

    def _finish(self, results, slot_bytes: int, roles) -> None:
        final_bytes = (roles.valid.sum(-1) * slot_bytes).tolist()
        for row, result in enumerate(results):
            # The last generated token is sampled but never fed, so it occupies no slot.
            result.kv_bytes_full = (result.prompt_tokens + max(result.n_generated - 1, 0)) * slot_bytes
            result.kv_bytes_final = int(final_bytes[row])
            result.kv_bytes_peak = max(result.kv_bytes_peak, result.prompt_tokens * slot_bytes)
            result.text = self.decode_marked(result.token_ids)

    def decode_marked(self, token_ids: list[int]) -> str:
        """Decode generated ids, writing each compression as ' <COMP>' and dropping other special tokens."""
        if self.comp is None:
            return self.tokenizer.decode(token_ids, skip_special_tokens=True)
        comp_set = set(self.comp.ids)
        pieces, current = [], []
        for index, token in enumerate(token_ids):
            if token in comp_set:
                if index == 0 or token_ids[index - 1] not in comp_set:
                    pieces.append(self.tokenizer.decode(current, skip_special_tokens=True))
                    pieces.append(" <COMP>")
                    current = []
            else:
                current.append(token)
        pieces.append(self.tokenizer.decode(current, skip_special_tokens=True))
        return "".join(pieces)
