"""`dyncomp train-compressor` on a tiny model: output format, over-length reporting, resuming."""

from __future__ import annotations

import json

import pytest

from dyncomp.cli import main
from test_pipeline import annotated_records


@pytest.fixture
def training_inputs(tmp_path, packaged_tokenizer):
    from conftest import make_tiny_model

    model_dir = tmp_path / "tiny-model"
    make_tiny_model("qwen2", vocab_size=len(packaged_tokenizer), seed=4).save_pretrained(model_dir)
    packaged_tokenizer.save_pretrained(model_dir)
    data = tmp_path / "annotated.json"
    records = annotated_records(40)
    records[0]["reasoning_with_compression"] = "A long step. " * 200 + "<COMP> done.\n#### 4"
    data.write_text(json.dumps(records))
    return str(model_dir), str(data), tmp_path


def train_args(model_dir, data, out, *extra):
    return ["train-compressor", "--model", model_dir, "--data", data, "--out", str(out), "--batch-size", "2",
            "--max-length", "256", "--eval-steps", "2", "--save-steps", "2", "--device", "cpu", *extra]


def test_train_writes_peft_adapter_and_summary(training_inputs, capsys):
    model_dir, data, root = training_inputs
    out = root / "compressor"
    assert main(train_args(model_dir, data, out, "--max-steps", "2")) == 0
    assert (out / "comp" / "adapter_config.json").is_file()
    assert (out / "comp" / "adapter_model.safetensors").is_file()
    metadata = json.loads((out / "dyncomp_compressor.json").read_text())
    assert metadata["record"]["comp_tokens"]["strings"] == ["<COMP>"]
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["steps"] == 2
    assert summary["validation_loss"] is not None
    # The 1,000-token record is over --max-length: it is counted, not dropped silently.
    too_long = summary["too_long_train_ids"] + summary["too_long_validation_ids"]
    assert too_long == ["comp-00000"]
    # The Trainer prints its own log lines first; the command's summary is the last JSON object.
    out = capsys.readouterr().out
    printed = json.loads(out[out.rindex('{\n  "train_traces"') :])
    assert printed["left_out_too_long"] == len(summary["too_long_train_ids"])


def test_train_resumes_from_checkpoint(training_inputs):
    model_dir, data, root = training_inputs
    out = root / "compressor"
    assert main(train_args(model_dir, data, out, "--max-steps", "2")) == 0
    (out / "dyncomp_compressor.json").unlink()
    assert main(train_args(model_dir, data, out, "--max-steps", "4", "--resume")) == 0
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["steps"] == 4


def test_train_refuses_to_overwrite(training_inputs, capsys):
    model_dir, data, root = training_inputs
    out = root / "compressor"
    assert main(train_args(model_dir, data, out, "--max-steps", "1")) == 0
    assert main(train_args(model_dir, data, out, "--max-steps", "1")) == 2
    assert "already contains a trained compressor" in capsys.readouterr().err


def test_train_resume_without_checkpoint_exits_2(training_inputs, capsys):
    model_dir, data, root = training_inputs
    assert main(train_args(model_dir, data, root / "fresh", "--resume")) == 2
    assert "contains no checkpoint" in capsys.readouterr().err


def test_train_merge_mode_not_supported(training_inputs, capsys):
    model_dir, data, root = training_inputs
    assert main(train_args(model_dir, data, root / "merge", "--mode", "merge", "--max-steps", "1")) == 2
    assert "merge" in capsys.readouterr().err
