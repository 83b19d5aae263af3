"""Aggregate per-sample records into the metrics of `metrics.json` (names as in the design table)."""

from __future__ import annotations

import math

import numpy as np

MIB = 2**20


def bootstrap_ci95(values: list[float], resamples: int = 2000, seed: int = 0) -> list[float]:
    """Return the 2.5th and 97.5th percentiles of the mean over bootstrap resamples."""
    if not values:
        return [math.nan, math.nan]
    data = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, len(data), size=(resamples, len(data)))].mean(axis=1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def summarize_method(records: list[dict]) -> dict:
    """Metrics of one method over its sample records."""
    n = len(records)
    if n == 0:
        return {"n": 0}
    correct = [1.0 if r["correct"] else 0.0 for r in records]
    peak = [r["kv_bytes_peak"] for r in records]
    full = [r["kv_bytes_full"] for r in records]
    # Each record carries its batch's wall time; dividing by the batch size counts every batch once.
    wall = sum(r["batch_seconds"] / r["batch_size"] for r in records)
    policy = sum(r["policy_seconds"] / r["batch_size"] for r in records)
    generated = sum(r["n_generated"] for r in records)
    return {
        "n": n,
        "accuracy": float(np.mean(correct)),
        "accuracy_ci95": bootstrap_ci95(correct),
        "avg_comp": float(np.mean([r["n_comp"] for r in records])),
        "kv_mb_peak": float(np.mean(peak)) / MIB,
        "kv_mb_final": float(np.mean([r["kv_bytes_final"] for r in records])) / MIB,
        "kv_mb_full": float(np.mean(full)) / MIB,
        "compression_ratio": sum(full) / sum(peak) if sum(peak) else math.nan,
        "dependency": float(np.mean([r["dependency"] for r in records])),
        "latency_s": float(np.mean([r["batch_seconds"] for r in records])),
        "throughput_tok_s": generated / wall if wall > 0 else math.nan,
        "classifier_share": policy / wall if wall > 0 and records[0].get("needs_hidden") else None,
        "avg_generated_tokens": generated / n,
        # Teacher-forced retention, filled in when annotated data is scored.
        "nll": None,
        "nll_ratio": None,
        "carried_value_acc": None,
    }


def summarize(records: list[dict], methods: list[str]) -> dict[str, dict]:
    """Metrics per method, in the order given, with `compression_vs_none` when `none` ran."""
    by_method = {method: [r for r in records if r["method"] == method] for method in methods}
    results = {method: summarize_method(rows) for method, rows in by_method.items()}
    none = results.get("none")
    for metrics in results.values():
        if none and none.get("n") and metrics.get("n"):
            metrics["compression_vs_none"] = none["kv_mb_peak"] / metrics["kv_mb_peak"]
        else:
            metrics["compression_vs_none"] = None
    return results
