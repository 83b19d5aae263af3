"""`dyncomp pipeline` on a tiny model: every stage runs once, then finished stages are skipped."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import make_tiny_model
from dyncomp.cli import main


def annotated_records(count: int) -> list[dict]:
    records = []
    for n in range(count):
        total = 3 * n + 4
        reasoning = (
            f"Tom starts with {n} apples and buys 4 more, so he has {n} + 4 = {n + 4} apples. <COMP>\n"
            f"He then gets {2 * n} from Mia, so {n + 4} + {2 * n} = {total}. <COMP>\n"
            f"So Tom has {total} apples.\n#### {total}"
        )
        records.append({"question": f"Tom has {n} apples, buys 4 and gets {2 * n} more. How many?", "reasoning_with_compression": reasoning, "answer": str(total)})
    return records


@pytest.fixture
def pipeline_config(tmp_path, packaged_tokenizer):
    model_dir = tmp_path / "tiny-model"
    make_tiny_model("llama", vocab_size=len(packaged_tokenizer), seed=2).save_pretrained(model_dir)
    packaged_tokenizer.save_pretrained(model_dir)
    annotated = tmp_path / "annotated.json"
    annotated.write_text(json.dumps(annotated_records(40)))
    gsm8k = tmp_path / "gsm8k.jsonl"
    gsm8k.write_text("".join(json.dumps({"question": r["question"], "answer": f"#### {r['answer']}"}) + "\n" for r in annotated_records(4)))
    config = {
        "model": str(model_dir),
        "annotated": str(annotated),
        "gsm8k": str(gsm8k),
        "compressor": {"out": str(tmp_path / "compressor"), "max_steps": 2, "batch_size": 2, "eval_steps": 2, "save_steps": 2},
        "classifier": {"out": str(tmp_path / "classifier"), "epochs": 2, "feature_cache": str(tmp_path / "features")},
        "eval": {"out": str(tmp_path / "eval"), "limit": 4, "batch_size": 2, "max_new_tokens": 12, "methods": "none,interval:4,classifier"},
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, tmp_path


def test_pipeline_runs_stages_then_skips(pipeline_config, capsys):
    path, root = pipeline_config
    assert main(["pipeline", "--config", str(path), "--device", "cpu"]) == 0
    assert (root / "compressor" / "dyncomp_compressor.json").is_file()
    assert (root / "classifier" / "classifier.json").is_file()
    metrics = json.loads((root / "eval" / "metrics.json").read_text())
    assert set(metrics) == {"none", "interval:4", "classifier"}
    assert "| classifier |" in capsys.readouterr().out

    adapter = root / "compressor" / "comp" / "adapter_model.safetensors"
    stamp = adapter.stat().st_mtime_ns
    assert main(["pipeline", "--config", str(path), "--device", "cpu"]) == 0
    assert adapter.stat().st_mtime_ns == stamp


def test_pipeline_unknown_key_exits_2(pipeline_config, capsys):
    path, _ = pipeline_config
    config = yaml.safe_load(path.read_text())
    config["eval"]["batchsize"] = 3
    path.write_text(yaml.safe_dump(config))
    assert main(["pipeline", "--config", str(path)]) == 2
    assert "unknown key(s) batchsize in 'eval'" in capsys.readouterr().err


def test_pipeline_missing_config_exits_2(tmp_path, capsys):
    assert main(["pipeline", "--config", str(tmp_path / "absent.yaml")]) == 2
    assert "pipeline config not found" in capsys.readouterr().err
