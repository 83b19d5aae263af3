"""Time decoding with and without prepacked linear weights, side by side, on the packaged model.

Run from the repository root after `make setup`:

    .venv/bin/python benchmarks/packed_weights_ab.py --out /tmp/packed_ab.json

For each batch size it decodes the first GSM8K prompts with the chosen policy (EOS ignored),
alternating an engine that packs its linear weights for MKL (`packed`) with one that calls
`F.linear` (`plain`). The JSON has decoding tokens per second (after the prompt's pass), the
median ratio per batch size, and whether both gave the same tokens.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dyncomp.bench.runner import Bench, BenchConfig, _median_ratio
from dyncomp.generation.engine import CompressingEngine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--pairs", type=int, default=3, help="alternating pairs of runs per batch size (default 3)")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per row (default 64)")
    parser.add_argument("--batches", default="1,8,16", help="comma-separated batch sizes (default 1,8,16)")
    parser.add_argument("--method", default="classifier", help="policy to decode with (default classifier)")
    args = parser.parse_args()

    bench = Bench(BenchConfig(quick=True))
    engines = {
        "packed": bench.engine,
        "plain": CompressingEngine(bench.model, bench.tokenizer, bench.comp, packed_weights=False),
    }
    summary = {}
    for batch in (int(b) for b in args.batches.split(",")):
        prompts = bench.prompts[:batch]
        engines["packed"].prepare_batch_size(batch)  # packs the weights outside the timing
        runs, tokens = {name: [] for name in engines}, {}
        for _ in range(args.pairs):
            for name, engine in engines.items():
                results, _ = bench.run_engine(engine, prompts, args.method, args.tokens)
                runs[name].append(sum(r.n_generated for r in results) / engine.last_stats.decode_seconds)
                tokens[name] = [r.token_ids for r in results]
        summary[f"batch{batch}"] = {
            "decode_tok_s_ratio_packed_over_plain": _median_ratio(list(zip(runs["packed"], runs["plain"]))),
            "identical_tokens": tokens["packed"] == tokens["plain"],
            "decode_tok_s": runs,
        }
        print(batch, json.dumps({k: v for k, v in summary[f"batch{batch}"].items() if k != "decode_tok_s"}), flush=True)
    result = {"method": args.method, "tokens": args.tokens, "pairs": args.pairs, "results": summary}
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
