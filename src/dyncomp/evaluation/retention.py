"""Teacher-forced retention: how much a compression method costs on known reasoning.

For each method the same reasoning tokens are scored under that method's `<COMP>` points and
compression mask; `none` scores them with no `<COMP>` and an ordinary causal mask. Because the
scored tokens are identical, the NLL ratio isolates what compression loses.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from dyncomp.models.tokens import CompTokens
from dyncomp.policies import DecodeState, make_policy
from dyncomp.compression.recurrent import compressed_forward
from dyncomp.training.compressor import token_losses
from dyncomp.training.encoding import IGNORE_INDEX, Reasoning, insert_comp, pad_batch

logger = logging.getLogger(__name__)


def teacher_forced_boundaries(policy, reasoning: Reasoning) -> list[int]:
    """Return the reasoning-token indices after which a prepared policy would insert `<COMP>`.

    The policy sees the reasoning one token at a time, as in generation; `oracle` takes the
    annotated boundaries as they are. Policies that read hidden states go through `engine_boundaries`.
    """
    if policy.name == "oracle":
        return list(reasoning.oracle_boundaries)
    if policy.needs_hidden:
        raise ValueError(f"method '{policy.spec()}' reads hidden states; use engine_boundaries")

    boundaries = []
    step_length = 0
    for index, token in enumerate(reasoning.reasoning_ids):
        step_length += 1
        state = DecodeState(last_tokens=torch.tensor([token]), step_lengths=torch.tensor([step_length]))
        if bool(policy.should_compress(state)[0]):
            boundaries.append(index)
            step_length = 0
    return boundaries


def engine_boundaries(model, tokenizer, comp: CompTokens, reasonings: list[Reasoning], policy, keep_prompt: bool, batch_size: int) -> list[list[int]]:
    """Find where a policy that reads hidden states compresses, by teacher-forced compressed decoding.

    The hidden state at each token depends on the compressions before it, so the reasoning is
    fed through the decoding engine with its tokens forced, exactly as generation would see it.
    """
    from dyncomp.generation.engine import CompressingEngine, DecodingConfig

    engine = CompressingEngine(model, tokenizer, comp)
    config = DecodingConfig(keep_prompt=keep_prompt)
    boundaries = []
    for start in tqdm(range(0, len(reasonings), batch_size), desc=f"boundaries {policy.spec()}", leave=False):
        chunk = reasonings[start : start + batch_size]
        results = engine.generate([r.prompt_ids for r in chunk], policy, config, forced=[r.reasoning_ids for r in chunk])
        # comp_after counts the tokens before a compression; the boundary is the last of them.
        boundaries.extend([[after - 1 for after in result.comp_after] for result in results])
    return boundaries


@dataclass
class RetentionTotals:
    nll_sum: float = 0.0
    tokens: int = 0
    carried_correct: int = 0
    carried_total: int = 0
    comp_groups: int = 0
    samples: int = 0

    def metrics(self) -> dict:
        return {
            "n": self.samples,
            "nll": self.nll_sum / max(self.tokens, 1),
            "carried_value_acc": self.carried_correct / self.carried_total if self.carried_total else math.nan,
            "avg_comp": self.comp_groups / max(self.samples, 1),
            "scored_tokens": self.tokens,
        }


@torch.no_grad()
def score_methods(
    model,
    tokenizer,
    comp: CompTokens,
    reasonings: list[Reasoning],
    methods: list[str],
    *,
    mode: str = "concat",
    keep_prompt: bool = True,
    batch_size: int = 4,
    min_step_tokens: int = 8,
    policy_context: dict | None = None,
) -> dict[str, dict]:
    """Score each method on the reasonings; returns {method: metrics} with `nll_ratio` against `none`.

    `policy_context` carries what some policies need, e.g. `{"classifier": TrainedClassifier}`.
    """
    device = next(model.parameters()).device
    results: dict[str, dict] = {}
    for method in ["none"] + [m for m in methods if m != "none"]:
        totals = RetentionTotals()
        policy = make_policy(method, min_step_tokens=min_step_tokens, **(policy_context or {}))
        if policy.needs_hidden:
            all_boundaries = engine_boundaries(model, tokenizer, comp, reasonings, policy, keep_prompt, batch_size)
        else:
            if not policy.teacher_forced_only:
                policy.prepare(tokenizer)
            all_boundaries = [teacher_forced_boundaries(policy, r) for r in reasonings]
        sequences = [
            insert_comp(reasoning, boundaries, None if method == "none" else comp)
            for reasoning, boundaries in zip(reasonings, all_boundaries)
        ]

        for start in tqdm(range(0, len(sequences), batch_size), desc=f"score {method}", leave=False):
            chunk = sequences[start : start + batch_size]
            batch = {name: tensor.to(device) for name, tensor in pad_batch(chunk, tokenizer.pad_token_id).items()}
            if method == "none":
                # An ordinary causal mask: the baseline must not depend on the compression mask code.
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
            else:
                logits = compressed_forward(model, batch, comp.ids, mode, keep_prompt).logits
            losses = token_losses(logits, batch["labels"])  # (batch, seq-1)
            scored = batch["labels"][:, 1:] != IGNORE_INDEX
            carried = batch["carried"][:, 1:] & scored
            predictions = logits[:, :-1].argmax(dim=-1)  # (batch, seq-1)
            totals.nll_sum += float(losses[scored].sum())
            totals.tokens += int(scored.sum())
            totals.carried_correct += int((predictions == batch["labels"][:, 1:])[carried].sum())
            totals.carried_total += int(carried.sum())
            totals.comp_groups += sum(s.n_comp_groups for s in chunk)
            totals.samples += len(chunk)
        results[method] = totals.metrics()
        logger.info("%s: nll %.4f, carried-value accuracy %.3f", method, results[method]["nll"], results[method]["carried_value_acc"])

    baseline = results["none"]["nll"]
    for method, metrics in results.items():
        metrics["nll_ratio"] = metrics["nll"] / baseline if baseline > 0 else math.nan
    # `none` is always scored, as the reference of nll_ratio, but reported only when asked for.
    return {m: results[m] for m in methods}
