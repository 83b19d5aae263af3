"""The report table and the accuracy/NLL-against-compression plot of an evaluation run."""

from __future__ import annotations

import math
from pathlib import Path


def _number(value, pattern: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return pattern.format(value)


def format_table(results: dict[str, dict]) -> str:
    """A markdown table with one row per method."""
    header = (
        "| method | n | accuracy (95% CI) | avg `<COMP>` | KV MiB peak | KV MiB full | compression | vs none "
        "| dependency | latency s | tok/s | classifier share | nll_ratio | carried acc |"
    )
    lines = [header, "|" + " --- |" * (header.count("|") - 1)]
    for method, m in results.items():
        if not m.get("n"):
            continue
        low, high = m["accuracy_ci95"]
        lines.append(
            f"| {method} | {m['n']} | {m['accuracy']:.1%} ({low:.1%}-{high:.1%}) | {m['avg_comp']:.2f} "
            f"| {m['kv_mb_peak']:.2f} | {m['kv_mb_full']:.2f} | {_number(m['compression_ratio'], '{:.2f}x')} "
            f"| {_number(m.get('compression_vs_none'), '{:.2f}x')} | {m['dependency']:.0f} | {m['latency_s']:.2f} "
            f"| {_number(m['throughput_tok_s'], '{:.1f}')} | {_number(m.get('classifier_share'), '{:.3f}')} "
            f"| {_number(m.get('nll_ratio'), '{:.3f}')} | {_number(m.get('carried_value_acc'), '{:.3f}')} |"
        )
    return "\n".join(lines)


def plot_pareto(results: dict[str, dict], path: Path) -> Path | None:
    """Plot accuracy and, where scored, NLL ratio against compression; returns None with fewer than two methods."""
    rows = [(method, m) for method, m in results.items() if m.get("n")]
    if len(rows) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_nll = any(m.get("nll_ratio") is not None for _, m in rows)
    figure, axes = plt.subplots(1, 2 if has_nll else 1, figsize=(11 if has_nll else 6, 4.2), squeeze=False)
    panels = [("accuracy", "accuracy")] + ([("nll_ratio", "NLL ratio (teacher-forced, lower is better)")] if has_nll else [])
    # Methods often share a compression ratio (newline and interval:N do), so a legend names
    # the points where text labels beside them would overlap.
    markers = "osD^v<>pPX*h"
    for axis, (key, label) in zip(axes[0], panels):
        for index, (method, m) in enumerate(rows):
            value = m.get(key)
            if value is None:
                continue
            axis.scatter(m["compression_ratio"], value, s=40, marker=markers[index % len(markers)], label=method, alpha=0.85)
        axis.set_xlabel("compression ratio (full KV / peak KV)")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8, loc="best")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
