"""`dyncomp eval` end to end on a tiny model: outputs, metric keys, resuming and bad input."""

from __future__ import annotations

import json

import pytest

from conftest import make_tiny_model
from dyncomp.cli import main

METRIC_KEYS = {
    "n", "accuracy", "accuracy_ci95", "avg_comp", "kv_mb_peak", "kv_mb_final", "kv_mb_full", "compression_ratio",
    "compression_vs_none", "dependency", "latency_s", "throughput_tok_s", "classifier_share", "nll", "nll_ratio",
    "carried_value_acc",
}


def eval_args(run, *extra, methods="none,interval:6,newline", limit="4"):
    return [
        "eval", "--model", run["model"], "--compressor", run["compressor"], "--data", run["data"],
        "--methods", methods, "--limit", limit, "--batch-size", "2", "--max-new-tokens", "16",
        "--min-step-tokens", "2", "--device", "cpu", "--out", str(run["out"]), *extra,
    ]


def test_eval_writes_outputs_with_every_metric(tiny_run, capsys):
    assert main(eval_args(tiny_run)) == 0
    out = tiny_run["out"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics) == ["none", "interval:6", "newline"]
    for method, values in metrics.items():
        assert METRIC_KEYS <= set(values), method
        assert values["n"] == 4
    assert metrics["none"]["compression_ratio"] == pytest.approx(1.0)
    assert metrics["interval:6"]["compression_ratio"] > 1.0
    assert metrics["interval:6"]["kv_mb_peak"] < metrics["none"]["kv_mb_peak"]
    assert metrics["none"]["classifier_share"] is None
    assert (out / "report.md").read_text().count("| interval:6 |") == 1
    assert (out / "pareto.png").stat().st_size > 1000
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 12
    assert "interval:6" in capsys.readouterr().out


def test_eval_resumes_after_interruption(tiny_run):
    assert main(eval_args(tiny_run)) == 0
    samples = tiny_run["out"] / "samples.jsonl"
    lines = samples.read_text().splitlines()
    # Keep 5 whole records and half of the sixth, as a crash mid-write would.
    samples.write_text("\n".join(lines[:5]) + "\n" + lines[5][: len(lines[5]) // 2])
    kept = [json.loads(line) for line in lines[:5]]

    assert main(eval_args(tiny_run)) == 0
    records = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(records) == 12
    assert records[:5] == kept
    assert len({(r["method"], r["id"]) for r in records}) == 12


def test_eval_rerun_adds_only_new_methods(tiny_run):
    assert main(eval_args(tiny_run, methods="none")) == 0
    first = (tiny_run["out"] / "samples.jsonl").read_text()
    assert main(eval_args(tiny_run, methods="none,interval:6")) == 0
    second = (tiny_run["out"] / "samples.jsonl").read_text()
    assert second.startswith(first)
    assert len(second.splitlines()) == 8


def test_eval_rejects_folder_of_other_configuration(tiny_run, capsys):
    assert main(eval_args(tiny_run, methods="none")) == 0
    assert main(eval_args(tiny_run, "--max-new-tokens", "9", methods="none")) == 2
    err = capsys.readouterr().err
    assert "was written with a different configuration" in err
    assert "max_new_tokens" in err


def test_eval_unknown_method_exits_2(tiny_run, capsys):
    assert main(eval_args(tiny_run, methods="none,sometimes")) == 2
    assert "unknown method 'sometimes'" in capsys.readouterr().err
    # A rejected run must not claim the output folder for its settings.
    assert not (tiny_run["out"] / "run.json").exists()


def test_eval_oracle_rejected_before_loading(tiny_run, capsys):
    tiny_run["model"] = "no-such-model"
    assert main(eval_args(tiny_run, methods="oracle")) == 2
    assert "works only teacher-forced" in capsys.readouterr().err


def test_eval_compressing_method_needs_compressor(tiny_run, capsys):
    args = eval_args(tiny_run)
    index = args.index("--compressor")
    del args[index : index + 2]
    assert main(args) == 2
    assert "need --compressor" in capsys.readouterr().err


def test_eval_data_without_answers_exits_2(tiny_run, tmp_path, capsys):
    bad = tmp_path / "no-answers.jsonl"
    bad.write_text(json.dumps({"question": "What is 2 + 2?"}) + "\n")
    tiny_run["data"] = str(bad)
    assert main(eval_args(tiny_run)) == 2
    assert "answer" in capsys.readouterr().err


def test_eval_adapter_for_other_model_exits_2(tiny_run, tmp_path, packaged_tokenizer, capsys):
    other_dir = tmp_path / "other-model"
    make_tiny_model("llama", vocab_size=len(packaged_tokenizer), seed=99).save_pretrained(other_dir)
    packaged_tokenizer.save_pretrained(other_dir)
    tiny_run["model"] = str(other_dir)
    assert main(eval_args(tiny_run)) == 2
    err = capsys.readouterr().err
    assert "made for base model" in err


def test_eval_shards_merge_to_full_run(tiny_run, tmp_path):
    out = tiny_run["out"]
    shard_dirs = []
    for index in range(2):
        tiny_run["out"] = tmp_path / f"shard{index}"
        shard_dirs.append(str(tiny_run["out"]))
        assert main(eval_args(tiny_run, "--shard", f"{index}/2")) == 0
    merged = tmp_path / "merged"
    assert main(["eval-merge", *shard_dirs, "--out", str(merged)]) == 0
    metrics = json.loads((merged / "metrics.json").read_text())
    assert metrics["none"]["n"] == 4

    tiny_run["out"] = out
    assert main(eval_args(tiny_run)) == 0
    whole = {(r["method"], r["id"]): r["text"] for r in map(json.loads, (out / "samples.jsonl").read_text().splitlines())}
    parts = {(r["method"], r["id"]): r["text"] for r in map(json.loads, (merged / "samples.jsonl").read_text().splitlines())}
    assert parts == whole


def test_eval_bad_shard_exits_2(tiny_run, capsys):
    assert main(eval_args(tiny_run, "--shard", "3/2")) == 2
    assert "invalid --shard" in capsys.readouterr().err
