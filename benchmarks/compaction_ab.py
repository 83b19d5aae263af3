"""Time compaction with and without row-local copies, side by side, on the packaged model.

Run from the repository root after `make setup`:

    .venv/bin/python benchmarks/compaction_ab.py --out /tmp/compaction_ab.json

It decodes the same 8 GSM8K prompts with the classifier policy for 256 tokens (EOS ignored).
The runs alternate the two compaction paths of a `growing_cache`. `row_local` copies only the
rows whose slots move, and `all_rows` gathers every row of every layer as a plain
`DynamicCache` does. Both give the same tokens. The JSON has tokens per second and the seconds
spent compacting.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from dyncomp.bench.runner import Bench, BenchConfig
from dyncomp.compression import cache as cache_module


def timed_compaction():
    """Wrap `SlotRoles.compact` so it adds its wall time to the returned list's first entry."""
    spent = [0.0]
    original = cache_module.SlotRoles.compact

    def compact(self, cache, drop):
        started = time.perf_counter()
        original(self, cache, drop)
        spent[0] += time.perf_counter() - started

    cache_module.SlotRoles.compact = compact
    return spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--pairs", type=int, default=3, help="alternating pairs of runs (default 3)")
    parser.add_argument("--tokens", type=int, default=256, help="new tokens per row (default 256)")
    args = parser.parse_args()

    bench = Bench(BenchConfig(quick=True))
    spent = timed_compaction()
    layer_class = cache_module._growing_layer_class()
    row_local = layer_class.compact_rows
    prompts = bench.prompts[:8]
    runs = {"row_local": [], "all_rows": []}
    tokens = {}
    for _ in range(args.pairs):
        for name in runs:
            if name == "row_local":
                layer_class.compact_rows = row_local
            else:
                del layer_class.compact_rows  # `gather_slots` then takes the all-rows path
            spent[0] = 0.0
            results, seconds = bench.run_engine(bench.engine, prompts, "classifier", args.tokens)
            generated = sum(r.n_generated for r in results)
            runs[name].append({"tok_s": generated / seconds, "compaction_s": spent[0], "seconds": seconds})
            tokens[name] = [r.token_ids for r in results]
    layer_class.compact_rows = row_local

    ratios = [a["tok_s"] / b["tok_s"] for a, b in zip(runs["row_local"], runs["all_rows"])]
    summary = {
        "tok_s_ratio_row_local_over_all_rows": statistics.median(ratios),
        "compaction_s_median": {name: statistics.median(r["compaction_s"] for r in runs[name]) for name in runs},
        "identical_tokens": tokens["row_local"] == tokens["all_rows"],
        "compressions": sum(r.n_comp for r in results),
        "runs": runs,
    }
    args.out.write_text(json.dumps(summary, indent=2))
    print(json.dumps({key: value for key, value in summary.items() if key != "runs"}, indent=2))


if __name__ == "__main__":
    main()
