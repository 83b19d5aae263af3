"""`dyncomp score`, `verify` and `generate` on a tiny model and compressor."""

from __future__ import annotations

import json

import pytest

from dyncomp.cli import main
from test_pipeline import annotated_records


@pytest.fixture
def annotated_file(tmp_path):
    path = tmp_path / "annotated.json"
    path.write_text(json.dumps(annotated_records(40)))
    return path


def test_score_reports_retention_per_method(tiny_run, annotated_file, tmp_path, capsys):
    out = tmp_path / "score"
    args = ["score", "--model", tiny_run["model"], "--compressor", tiny_run["compressor"], "--data", str(annotated_file),
            "--split", "test", "--methods", "oracle,newline,interval:8,none", "--min-step-tokens", "2", "--out", str(out)]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())["methods"]
    assert list(metrics) == ["oracle", "newline", "interval:8", "none"]
    assert metrics["none"]["nll_ratio"] == pytest.approx(1.0)
    assert metrics["none"]["avg_comp"] == 0
    assert metrics["oracle"]["avg_comp"] == pytest.approx(2.0)
    for values in metrics.values():
        assert values["scored_tokens"] == metrics["none"]["scored_tokens"]
        assert 0.0 <= values["carried_value_acc"] <= 1.0
    # A random adapter makes compression hurt, so the ratio moves away from 1.
    assert metrics["oracle"]["nll_ratio"] != pytest.approx(1.0, abs=1e-4)
    assert "| oracle |" in capsys.readouterr().out


def test_score_untrained_adapter_needs_no_compressor(tiny_run, annotated_file, tmp_path):
    out = tmp_path / "score"
    args = ["score", "--model", tiny_run["model"], "--data", str(annotated_file), "--methods", "oracle", "--out", str(out)]
    assert main(args) == 0
    assert "untrained adapter" in (out / "report.md").read_text()


def test_score_unknown_method_exits_2(tiny_run, annotated_file, tmp_path, capsys):
    args = ["score", "--model", tiny_run["model"], "--data", str(annotated_file), "--methods", "oracle,every:3", "--out", str(tmp_path)]
    assert main(args) == 2
    assert "unknown method 'every:3'" in capsys.readouterr().err


def test_verify_passes_with_trained_and_untrained_adapter(tiny_run, capsys):
    assert main(["verify", "--model", tiny_run["model"], "--compressor", tiny_run["compressor"]]) == 0
    assert main(["verify", "--model", tiny_run["model"]]) == 0
    out = capsys.readouterr().out
    assert out.count("PASS") == 2
    assert "random LoRA-B weights" in out


def test_verify_reports_sliding_window_unsupported(tmp_path, packaged_tokenizer, capsys):
    from conftest import make_tiny_model

    model = make_tiny_model("mistral", vocab_size=len(packaged_tokenizer))
    model.config.sliding_window = 16
    model.save_pretrained(tmp_path / "windowed")
    packaged_tokenizer.save_pretrained(tmp_path / "windowed")
    assert main(["verify", "--model", str(tmp_path / "windowed")]) == 1
    assert "NOT SUPPORTED" in capsys.readouterr().out


def test_generate_streams_compression_marks(tiny_run, capsys):
    args = ["generate", "--model", tiny_run["model"], "--compressor", tiny_run["compressor"], "--method", "interval:5",
            "--min-step-tokens", "1", "--max-new-tokens", "16", "What is 2 plus 2?"]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert captured.out.count("<COMP kv=") == 3
    assert "3 compressions" in captured.err


def test_generate_from_data_file(tiny_run, capsys):
    args = ["generate", "--model", tiny_run["model"], "--data", tiny_run["data"], "--index", "2", "--max-new-tokens", "4"]
    assert main(args) == 0
    assert "gold 5" in capsys.readouterr().err


def test_generate_method_without_compressor_exits_2(tiny_run, capsys):
    assert main(["generate", "--model", tiny_run["model"], "--method", "newline", "Hi"]) == 2
    assert "need --compressor" in capsys.readouterr().err
