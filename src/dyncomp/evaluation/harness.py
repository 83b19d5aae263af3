"""`dyncomp eval`: generate for GSM8K problems under each method and measure accuracy, memory and speed."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dyncomp.data.gsm8k import Problem, extract_answer, is_correct, load_gsm8k
from dyncomp.errors import UserError
from dyncomp.evaluation.metrics import summarize
from dyncomp.evaluation.records import SAMPLES_FILE, append_records, check_run_identity, read_records, repair_tail
from dyncomp.evaluation.report import format_table, plot_pareto
from dyncomp.models.loading import DEFAULT_MODEL
from dyncomp.policies import REGISTRY, check_method, make_policy, parse_methods

logger = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    """Settings of `dyncomp eval`; the CLI and the pipeline take their defaults from here."""

    data: str = ""
    out: str = ""
    model: str = DEFAULT_MODEL
    compressor: str | None = None
    classifier: str | None = None
    methods: str = "none,newline,classifier"
    offset: int = 0
    limit: int | None = None
    batch_size: int = 8
    max_new_tokens: int = 256
    min_step_tokens: int = 8
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    annotated: str | None = None
    """Annotated reasoning whose test split is scored teacher-forced for nll, nll_ratio, carried_value_acc."""
    annotated_limit: int | None = None
    shard: str | None = None
    """'i/n': evaluate every n-th problem starting at i, for several processes or machines."""
    device: str | None = None
    dtype: str | None = None
    profile: bool = False


def parse_shard(text: str | None) -> tuple[int, int]:
    if text is None:
        return 0, 1
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        index, count = -1, 0
    if count < 1 or not 0 <= index < count:
        raise UserError(f"invalid --shard '{text}'; use i/n with 0 <= i < n, e.g. 0/4")
    return index, count


def file_digest(path: str | Path | None, pattern: str = "*.safetensors") -> str | None:
    """Hash the weight files of an artifact folder, so records name exactly what produced them."""
    if path is None:
        return None
    folder = Path(path)
    digest = hashlib.sha256()
    for file in sorted(folder.rglob(pattern)):
        if "checkpoint" in str(file.relative_to(folder)):
            continue
        digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def run_identity(config: EvalConfig) -> dict:
    return {
        "model": config.model,
        "compressor": file_digest(config.compressor),
        "classifier": file_digest(config.classifier),
        "data": str(Path(config.data).resolve()) if Path(config.data).exists() else config.data,
        "offset": config.offset,
        "limit": config.limit,
        "max_new_tokens": config.max_new_tokens,
        "min_step_tokens": config.min_step_tokens,
        "temperature": config.temperature,
        "top_p": config.top_p,
        "seed": config.seed,
    }


def load_for_methods(config: EvalConfig, methods: list[str]):
    """Load the model (with compressor when one is given) and the classifier policies' context."""
    from dyncomp.models.compressed import load_compressed_model
    from dyncomp.models.loading import load_model

    needs_compressor = any(m != "none" for m in methods)
    if needs_compressor and config.compressor is None:
        raise UserError(f"methods {', '.join(m for m in methods if m != 'none')} compress, so they need --compressor DIR (from train-compressor)")
    if config.compressor is None:
        loaded = load_model(config.model, device=config.device, dtype=config.dtype)
        model, tokenizer, comp, keep_prompt = loaded.model, loaded.tokenizer, None, True
    else:
        compressed = load_compressed_model(config.model, config.compressor, device=config.device, dtype=config.dtype)
        model, tokenizer, comp, keep_prompt = compressed.model, compressed.tokenizer, compressed.comp, compressed.config.keep_prompt

    context = {}
    if any(m.split(":")[0] == "classifier" for m in methods):
        if config.classifier is None:
            raise UserError("method 'classifier' needs --classifier DIR (from train-classifier)")
        from dyncomp.classifier.probe import load_classifier

        classifier = load_classifier(config.classifier, device=str(next(model.parameters()).device))
        classifier.check_model(model, tokenizer, comp, config.model)
        classifier.check_compressor(config.compressor)
        context["classifier"] = classifier
    return model, tokenizer, comp, keep_prompt, context


def _record(problem: Problem, method: str, result, batch_seconds: float, policy_seconds: float, batch_size: int, needs_hidden: bool) -> dict:
    answer = extract_answer(result.text)
    return {
        "id": problem.id,
        "method": method,
        "text": result.text,
        "answer": answer,
        "gold": problem.gold,
        "correct": is_correct(result.text, problem.gold),
        "n_generated": result.n_generated,
        "n_comp": result.n_comp,
        "comp_after": result.comp_after,
        "prompt_tokens": result.prompt_tokens,
        "kv_bytes_peak": result.kv_bytes_peak,
        "kv_bytes_final": result.kv_bytes_final,
        "kv_bytes_full": result.kv_bytes_full,
        "dependency": result.dependency,
        "stop_reason": result.stop_reason,
        "batch_seconds": batch_seconds,
        "policy_seconds": policy_seconds,
        "batch_size": batch_size,
        "needs_hidden": needs_hidden,
    }


def _generate_method(engine, tokenizer, problems, method, policy, decoding, config, samples_path, done_ids) -> None:
    from dyncomp.prompting import format_prompt

    todo = [p for p in problems if p.id not in done_ids]
    if not todo:
        return
    progress = tqdm(total=len(todo), desc=f"eval {method}", unit="sample")
    correct = generated = 0
    seconds = 0.0
    for start in range(0, len(todo), config.batch_size):
        chunk = todo[start : start + config.batch_size]
        started = time.perf_counter()
        results = engine.generate([format_prompt(tokenizer, p.question) for p in chunk], policy, decoding)
        wall = time.perf_counter() - started
        stats = engine.last_stats
        records = [_record(p, method, r, wall, stats.policy_seconds, len(chunk), policy.needs_hidden) for p, r in zip(chunk, results)]
        append_records(samples_path, records)

        correct += sum(r["correct"] for r in records)
        generated += sum(r["n_generated"] for r in records)
        seconds += wall
        progress.update(len(chunk))
        progress.set_postfix(acc=f"{correct / progress.n:.1%}", tok_s=f"{generated / seconds:.1f}")
    progress.close()


def _retention(config: EvalConfig, model, tokenizer, comp, keep_prompt, methods, context) -> dict[str, dict]:
    from dyncomp.data.annotated import load_annotated, split_annotated
    from dyncomp.evaluation.retention import score_methods
    from dyncomp.training.encoding import tokenize_reasoning

    examples = split_annotated(load_annotated(config.annotated), "test")
    if config.annotated_limit is not None:
        examples = examples[: config.annotated_limit]
    reasonings = [tokenize_reasoning(tokenizer, e.id, e.question, e.steps()) for e in examples]
    return score_methods(
        model, tokenizer, comp, reasonings, methods, keep_prompt=keep_prompt,
        batch_size=config.batch_size, min_step_tokens=config.min_step_tokens, policy_context=context,
    )


def _profile(engine, tokenizer, problems, policy, decoding, out: Path) -> Path:
    """Write a torch.profiler trace of a few decoding steps of one batch."""
    from torch.profiler import ProfilerActivity, profile

    from dyncomp.prompting import format_prompt

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    short = dataclasses.replace(decoding, max_new_tokens=min(decoding.max_new_tokens, 32))
    with profile(activities=activities, record_shapes=True) as profiler:
        engine.generate([format_prompt(tokenizer, p.question) for p in problems], policy, short)
    path = out / f"profile-{policy.spec().replace(':', '_')}.json"
    profiler.export_chrome_trace(str(path))
    (out / f"profile-{policy.spec().replace(':', '_')}.txt").write_text(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
    return path


def run_eval(config: EvalConfig) -> dict:
    """Run every method on the problems, resuming from existing records; returns the metrics."""
    from dyncomp.generation.engine import CompressingEngine, DecodingConfig

    if not config.out:
        raise UserError("missing --out: give a folder for samples.jsonl, metrics.json and report.md")
    if config.batch_size < 1 or config.max_new_tokens < 1:
        raise UserError("--batch-size and --max-new-tokens must be at least 1")
    methods = parse_methods(config.methods)
    shard_index, shard_count = parse_shard(config.shard)
    problems = load_gsm8k(config.data, offset=config.offset, limit=config.limit)
    problems = problems[shard_index::shard_count]
    if not problems:
        raise UserError(f"shard {config.shard} of {config.data} contains no problems; use fewer shards")

    for method in methods:
        check_method(method)
        if REGISTRY[method.partition(":")[0]].teacher_forced_only:
            raise UserError(f"method '{method}' works only teacher-forced (dyncomp score), not in eval")
    out = Path(config.out)
    identity = run_identity(config)
    check_run_identity(out, identity, write=False)

    model, tokenizer, comp, keep_prompt, context = load_for_methods(config, methods)
    policies = {m: make_policy(m, min_step_tokens=config.min_step_tokens, **context) for m in methods}
    # The folder is claimed only once every input has been checked, so a typo leaves nothing behind.
    check_run_identity(out, identity)
    samples_path = out / SAMPLES_FILE
    repair_tail(samples_path)
    engine = CompressingEngine(model, tokenizer, comp)
    decoding = DecodingConfig(
        max_new_tokens=config.max_new_tokens, temperature=config.temperature, top_p=config.top_p,
        seed=config.seed, keep_prompt=keep_prompt,
    )

    wanted_ids = {p.id for p in problems}
    for method, policy in policies.items():
        done = {r["id"] for r in read_records(samples_path) if r["method"] == method}
        _generate_method(engine, tokenizer, problems, method, policy, decoding, config, samples_path, done & wanted_ids)

    if config.profile:
        for method, policy in policies.items():
            logger.info("profile written to %s", _profile(engine, tokenizer, problems[: config.batch_size], policy, decoding, out))

    records = [r for r in read_records(samples_path) if r["id"] in wanted_ids and r["method"] in policies]
    results = summarize(records, methods)
    if config.annotated and shard_index == 0:
        retention = _retention(config, model, tokenizer, comp, keep_prompt, methods, context)
        for method, scores in retention.items():
            results[method].update({key: scores[key] for key in ("nll", "nll_ratio", "carried_value_acc")})
    write_outputs(out, results, config)
    return results


def write_outputs(out: Path, results: dict[str, dict], config: EvalConfig) -> None:
    """Write metrics.json, report.md and, with two or more methods, pareto.png."""
    (out / "metrics.json").write_text(json.dumps(results, indent=2))
    table = format_table(results)
    header = (
        f"# dyncomp eval\n\nModel `{config.model}`, compressor `{config.compressor}`, classifier `{config.classifier}`, "
        f"data `{config.data}` (offset {config.offset}, limit {config.limit}, shard {config.shard or 'all'}), "
        f"batch size {config.batch_size}, max {config.max_new_tokens} new tokens.\n\n"
    )
    (out / "report.md").write_text(header + table + "\n")
    plot_pareto(results, out / "pareto.png")
