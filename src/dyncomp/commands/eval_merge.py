"""`dyncomp eval-merge`: combine the records of `eval --shard` runs into one report."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("eval-merge", help="combine sharded eval folders into one metrics.json and report")
    parser.add_argument("shards", nargs="+", help="output folders of 'dyncomp eval --shard i/n'")
    parser.add_argument("--out", required=True, help="folder for the merged samples.jsonl, metrics.json and report.md")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from dyncomp.errors import UserError
    from dyncomp.evaluation.harness import EvalConfig, write_outputs
    from dyncomp.evaluation.metrics import summarize
    from dyncomp.evaluation.records import RUN_FILE, SAMPLES_FILE, append_records, check_run_identity, read_records
    from dyncomp.evaluation.report import format_table

    identities, records = [], []
    for folder in map(Path, args.shards):
        if not (folder / RUN_FILE).is_file():
            raise UserError(f"{folder} has no {RUN_FILE}; pass output folders of 'dyncomp eval'")
        identities.append(json.loads((folder / RUN_FILE).read_text()))
        records.extend(read_records(folder / SAMPLES_FILE))
    if any(identity != identities[0] for identity in identities):
        raise UserError("the shard folders were made with different settings; merge only shards of one run")

    out = Path(args.out)
    check_run_identity(out, identities[0])
    seen = set()
    unique = []
    for record in records:
        key = (record["method"], record["id"])
        if key not in seen:
            seen.add(key)
            unique.append(record)
    (out / SAMPLES_FILE).unlink(missing_ok=True)
    append_records(out / SAMPLES_FILE, unique)

    methods = list(dict.fromkeys(r["method"] for r in unique))
    results = summarize(unique, methods)
    first_metrics = Path(args.shards[0]) / "metrics.json"
    if first_metrics.is_file():
        # Teacher-forced scores are computed once, by shard 0.
        for method, metrics in json.loads(first_metrics.read_text()).items():
            if method in results:
                results[method].update({k: metrics.get(k) for k in ("nll", "nll_ratio", "carried_value_acc")})
    config = EvalConfig(model=identities[0]["model"], data=identities[0]["data"], out=str(out), shard=f"merged from {len(args.shards)}")
    write_outputs(out, results, config)
    print(format_table(results))
    return 0
