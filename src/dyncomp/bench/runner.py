"""`dyncomp bench`: speed and memory comparisons, each run side by side in one process.

Every comparison alternates its two sides (A, B, A, B, ...) and reports the median of the
per-pair ratios, so a drift in machine speed affects both sides alike. The machines this runs
on are shared and noisy, so only ratios carry targets.
"""

from __future__ import annotations

import copy
import datetime
import json
import logging
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dyncomp.errors import UserError
from dyncomp.models.loading import DEFAULT_MODEL

logger = logging.getLogger(__name__)

# key: (target, "min" when the value must reach the target, "max" when it must stay below it)
TARGETS = {
    "none_vs_hf_generate": (0.95, "min"),
    "compressed_vs_none_b8": (1.0, "min"),
    "compressed_vs_none_len1024": (1.2, "min"),
    "batch16_vs_batch1": (4.0, "min"),
    "vs_reference_loop": (8.0, "min"),
    "classifier_share": (0.01, "max"),
    "peak_kv_ratio_4096": (0.25, "max"),
    "warm_load_s": (2.0, "max"),
}


@dataclass
class BenchConfig:
    """Settings of `dyncomp bench`; the CLI takes its defaults from here."""

    out: str = "benchmarks/results.json"
    quick: bool = False
    model: str = DEFAULT_MODEL
    compressor: str = "artifacts/compressor-smollm2"
    classifier: str = "artifacts/classifier-smollm2"
    data: str = "../shared/data/gsm8k/test.jsonl"
    device: str | None = None
    repeats: int | None = None
    """Pairs per comparison; default 3, and with --quick 1 except for `none_vs_hf_generate`."""


def _median_ratio(pairs: list[tuple[float, float]]) -> float:
    return statistics.median(a / b for a, b in pairs)


def _throughput(results, seconds: float) -> float:
    return sum(r.n_generated for r in results) / seconds


class Bench:
    def __init__(self, config: BenchConfig):
        from dyncomp.data.gsm8k import load_gsm8k
        from dyncomp.evaluation.harness import EvalConfig, load_for_methods
        from dyncomp.generation.engine import CompressingEngine
        from dyncomp.models.loading import load_model
        from dyncomp.prompting import format_prompt

        self.config = config
        self.repeats = config.repeats or (1 if config.quick else 3)
        for path, what in ((config.compressor, "compressor"), (config.classifier, "classifier")):
            if not Path(path).is_dir():
                raise UserError(f"{what} folder {path} not found; pass --{what} DIR (see the README's pipeline)")

        # The model is loaded once before timing, so the conversion of a .gguf is not in warm_load_s.
        load_model(config.model, device=config.device)
        started = time.perf_counter()
        # HF generate runs with its default attention (sdpa), the one the engine decodes with.
        self.plain = load_model(config.model, device=config.device, attn_implementation="sdpa")
        self.warm_load_s = time.perf_counter() - started

        model, tokenizer, comp, keep_prompt, context = load_for_methods(
            EvalConfig(model=config.model, compressor=config.compressor, classifier=config.classifier, device=config.device),
            ["classifier"],
        )
        self.model, self.tokenizer, self.comp, self.context = model, tokenizer, comp, context
        self.engine = CompressingEngine(model, tokenizer, comp)
        self.plain_engine = CompressingEngine(self.plain.model, self.plain.tokenizer, None)
        problems = load_gsm8k(config.data, limit=16)
        self.prompts = [format_prompt(tokenizer, p.question) for p in problems]
        # One short untimed run per decoder, so first-call allocations fall outside every timing,
        # and weight copies packed for the batch sizes timed below.
        for engine in (self.engine, self.plain_engine):
            self.run_engine(engine, self.prompts[:2], "none", 4)
            engine.prepare_batch_size(8)
        self.engine.prepare_batch_size(16)
        self.run_engine(self.engine, self.prompts[:2], "classifier", 4)
        self.hf_generate(self.prompts[:2], 4)

    def policy(self, method: str):
        from dyncomp.policies import make_policy

        return make_policy(method, **self.context)

    def run_engine(self, engine, prompts, method: str, new_tokens: int, ignore_eos: bool = True):
        from dyncomp.generation.engine import DecodingConfig

        started = time.perf_counter()
        results = engine.generate(prompts, self.policy(method), DecodingConfig(max_new_tokens=new_tokens, ignore_eos=ignore_eos))
        return results, time.perf_counter() - started

    def hf_generate(self, prompts, new_tokens: int):
        tokenizer, model = self.plain.tokenizer, self.plain.model
        encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        started = time.perf_counter()
        with torch.inference_mode():
            output = model.generate(
                **encoded, max_new_tokens=new_tokens, do_sample=False, top_k=None, top_p=None, temperature=None,
                pad_token_id=tokenizer.pad_token_id,
            )
        seconds = time.perf_counter() - started
        rows = []
        eos = tokenizer.eos_token_id
        for row in output[:, encoded["input_ids"].shape[1]:].tolist():
            rows.append(row[: row.index(eos) + 1] if eos in row else row)
        return rows, seconds

    def compare_none_with_hf(self, new_tokens: int, repeats: int | None = None) -> dict:
        prompts = self.prompts[:8]
        pairs, identical = [], True
        for _ in range(repeats or self.repeats):
            results, engine_seconds = self.run_engine(self.plain_engine, prompts, "none", new_tokens, ignore_eos=False)
            rows, hf_seconds = self.hf_generate(prompts, new_tokens)
            identical &= [r.token_ids for r in results] == rows
            tokens = sum(len(row) for row in rows)
            pairs.append((tokens / engine_seconds, tokens / hf_seconds))
        return {"ratio": _median_ratio(pairs), "identical_tokens": identical, "engine_tok_s": pairs[-1][0], "hf_tok_s": pairs[-1][1]}

    def compare_methods(self, method_a: str, method_b: str, batch: int, new_tokens: int) -> dict:
        prompts = self.prompts[:batch]
        pairs, shares, peaks = [], [], []
        for _ in range(self.repeats):
            results_a, seconds_a = self.run_engine(self.engine, prompts, method_a, new_tokens)
            stats_a = self.engine.last_stats
            results_b, seconds_b = self.run_engine(self.engine, prompts, method_b, new_tokens)
            pairs.append((_throughput(results_a, seconds_a), _throughput(results_b, seconds_b)))
            shares.append(stats_a.policy_seconds / max(stats_a.decode_seconds, 1e-9))
            peaks.append((sum(r.kv_bytes_peak for r in results_a), sum(r.kv_bytes_peak for r in results_b)))
        return {
            "ratio": _median_ratio(pairs), "a_tok_s": pairs[-1][0], "b_tok_s": pairs[-1][1],
            "policy_share_a": statistics.median(shares), "peak_ratio": peaks[-1][0] / peaks[-1][1],
            "avg_comp_a": sum(r.n_comp for r in results_a) / len(results_a),
        }

    def compare_batch_and_reference(self, method: str, new_tokens: int) -> dict:
        """Decoding throughput of the engine at batch 16 against batch 1 and against the reference loop.

        Throughput here is generated tokens over the seconds after the prompt pass (1 / time per
        output token), on both sides: at a few hundred tokens the batch-16 prompt pass would
        otherwise weigh more than the decoding being compared. End-to-end ratios are recorded too.
        """
        from dyncomp.bench.reference import reference_generate
        from dyncomp.generation.engine import decoding_attention

        batch_pairs, reference_pairs, end_to_end = [], [], []
        for _ in range(self.repeats):
            results_16, seconds_16 = self.run_engine(self.engine, self.prompts[:16], method, new_tokens)
            decode_16 = self.engine.last_stats.decode_seconds
            results_1, seconds_1 = self.run_engine(self.engine, self.prompts[:1], method, new_tokens)
            decode_1 = self.engine.last_stats.decode_seconds
            with decoding_attention(self.model):  # the same attention kernel on both sides: the loop is what is compared
                tokens, reference_seconds, reference_prompt_seconds = reference_generate(
                    self.model, self.tokenizer, self.comp, self.prompts[0], self.policy(method), new_tokens
                )
            generated = sum(1 for t in tokens if t not in self.comp.ids)
            batch16 = _throughput(results_16, decode_16)
            batch_pairs.append((batch16, _throughput(results_1, decode_1)))
            reference_pairs.append((batch16, generated / (reference_seconds - reference_prompt_seconds)))
            end_to_end.append((_throughput(results_16, seconds_16), _throughput(results_1, seconds_1), generated / reference_seconds))
        last = end_to_end[-1]
        return {
            "batch16_vs_batch1": {"ratio": _median_ratio(batch_pairs), "batch16_decode_tok_s": batch_pairs[-1][0], "batch1_decode_tok_s": batch_pairs[-1][1],
                                  "end_to_end_ratio": statistics.median(a / b for a, b, _ in end_to_end)},
            "vs_reference_loop": {"ratio": _median_ratio(reference_pairs), "engine_batch16_decode_tok_s": reference_pairs[-1][0],
                                  "reference_decode_tok_s": reference_pairs[-1][1], "end_to_end_ratio": statistics.median(a / c for a, _, c in end_to_end)},
            "end_to_end_tok_s": {"batch16": last[0], "batch1": last[1], "reference": last[2]},
        }

    def peak_kv_ratio(self, new_tokens: int, layers: int | None) -> dict:
        """Peak KV of interval:64 over none's at `new_tokens` teacher-forced tokens, counted from the cache.

        The ratio depends only on how many slots each row holds, which a token-count policy fixes,
        so the tokens are forced (GSM8K prompt text, repeated) and the language-model head is
        skipped. With `layers`, a copy of the model cut to its first `layers` layers is used.
        """
        from dyncomp.generation.engine import CompressingEngine, DecodingConfig

        model = self.model
        if layers is not None:
            model = copy.deepcopy(self.model)
            decoder = model.get_base_model().get_decoder()
            decoder.layers = decoder.layers[:layers]
            model.config.num_hidden_layers = layers
        engine = CompressingEngine(model, self.tokenizer, self.comp)
        text_ids = [i for prompt in self.prompts for i in self.tokenizer(prompt, add_special_tokens=False)["input_ids"]]
        forced = (text_ids * (new_tokens // len(text_ids) + 1))[:new_tokens]
        peaks = {}
        for method in ("interval:64", "none"):
            result = engine.generate(self.prompts[:1], self.policy(method), DecodingConfig(), forced=[forced])[0]
            peaks[method] = result.kv_bytes_peak
        return {"ratio": peaks["interval:64"] / peaks["none"], "peak_bytes": peaks, "layers": layers or "all", "tokens": "forced"}

    def time_per_token(self, lengths: list[int]) -> dict:
        """Seconds per generated token at batch 1 for each method and generation length, and the peaks at the longest."""
        methods = ("none", "interval:64", "classifier")
        table, peaks = {method: {} for method in methods}, {}
        # The methods take turns at each length, so a drift in the machine's speed shows in all
        # three lines instead of in the method that happened to run last.
        for length in lengths:
            for method in methods:
                results, seconds = self.run_engine(self.engine, self.prompts[:1], method, length)
                table[method][length] = seconds / results[0].n_generated
                peaks[method] = results[0].kv_bytes_peak
        return {"seconds_per_token": table, "peak_bytes_at_longest": peaks}


def plot_time_per_token(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for method, values in table.items():
        lengths = sorted(int(k) for k in values)
        axis.plot(lengths, [values[k] * 1000 for k in lengths], marker="o", label=method)
    axis.set_xscale("log", base=2)
    axis.set_xlabel("generated tokens (batch 1)")
    axis.set_ylabel("ms per generated token (whole run)")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def format_table(results: dict) -> str:
    lines = ["| key | value | target | met |", "| --- | --- | --- | --- |"]
    for key, (target, kind) in TARGETS.items():
        value = results["ratios"].get(key)
        if value is None:
            lines.append(f"| `{key}` | not measured | {'>=' if kind == 'min' else '<='} {target} | no |")
            continue
        met = value >= target if kind == "min" else value <= target
        lines.append(f"| `{key}` | {value:.3f} | {'>=' if kind == 'min' else '<='} {target} | {'yes' if met else 'no'} |")
    return "\n".join(lines)


def _source_commit() -> str | None:
    """Return the git commit of the dyncomp sources, or None outside a git checkout."""
    import subprocess

    try:
        completed = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return completed.stdout.strip() or None


def run_bench(config: BenchConfig) -> dict:
    """Run every comparison and write the JSON results and a markdown table next to them."""
    from tqdm.auto import tqdm

    bench = Bench(config)
    short, medium = (64, 96) if config.quick else (128, 256)
    details: dict = {}
    # With --quick a side of this comparison takes about 6 s on 2 cores, and one pair swung from
    # 0.89 to 1.03 between runs. Three pairs add about 25 s and keep the run under 5 minutes.
    hf_tokens, hf_repeats = (short, config.repeats or 3) if config.quick else (medium, None)
    steps = [
        ("none_vs_hf_generate", lambda: bench.compare_none_with_hf(hf_tokens, repeats=hf_repeats)),
        ("compressed_vs_none_b8", lambda: bench.compare_methods("classifier", "none", 8, medium)),
        ("compressed_vs_none_len1024", lambda: bench.compare_methods("interval:64", "none", 8, 1024)),
        ("batch_and_reference", lambda: bench.compare_batch_and_reference("classifier", short)),
    ]
    if config.quick:
        steps.append(("peak_kv_ratio_4096", lambda: bench.peak_kv_ratio(4096, layers=2)))
    else:
        steps.append(("time_per_token", lambda: bench.time_per_token([256, 1024, 4096])))
    for key, step in tqdm(steps, desc="bench", unit="comparison"):
        started = time.perf_counter()
        details[key] = step()
        details[key]["seconds"] = time.perf_counter() - started
        logger.info("%s: %s", key, json.dumps(details[key], default=str))
    if "batch_and_reference" in details:
        combined = details.pop("batch_and_reference")
        details["batch16_vs_batch1"] = combined["batch16_vs_batch1"]
        details["vs_reference_loop"] = combined["vs_reference_loop"]
        details["batch16_vs_batch1"]["end_to_end_tok_s"] = combined["end_to_end_tok_s"]
    if "time_per_token" in details:
        peaks = details["time_per_token"]["peak_bytes_at_longest"]
        details["peak_kv_ratio_4096"] = {"ratio": peaks["interval:64"] / peaks["none"], "peak_bytes": peaks, "layers": "all", "tokens": "generated"}

    ratios = {key: details[key]["ratio"] for key in details if "ratio" in details[key]}
    ratios["classifier_share"] = details["compressed_vs_none_b8"]["policy_share_a"]
    ratios["warm_load_s"] = bench.warm_load_s
    results = {
        "ratios": ratios,
        "details": details,
        "identical_tokens_vs_hf": details["none_vs_hf_generate"]["identical_tokens"],
        "config": asdict(config),
        "environment": {
            "date": datetime.date.today().isoformat(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "machine": platform.machine(),
            "processor": platform.processor(),
            "device": str(next(bench.model.parameters()).device),
            "commit": _source_commit(),
        },
    }
    out = Path(config.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))
    out.with_suffix(".md").write_text(format_table(results) + "\n")
    if "time_per_token" in details:
        plot_time_per_token(details["time_per_token"]["seconds_per_token"], out.with_name(out.stem + "-time-per-token.png"))
    return results
