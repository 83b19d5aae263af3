"""Loading GSM8K and annotated reasoning: formats, input errors, steps and splits."""

from __future__ import annotations

import json
import logging
import sys

import pytest

from dyncomp.data import (
    AnnotatedExample,
    load_annotated,
    load_gsm8k,
    save_annotated,
    split_annotated,
)
from dyncomp.errors import UserError

RECORDS = [
    {"question": "Q0: 48 clips, half as many in May?", "answer": "48/2 = <<48/2=24>>24\n48+24 = <<48+24=72>>72\n#### 72"},
    {"question": "Q1: $12 an hour for 50 minutes?", "answer": "12/60 = <<12/60=0.2>>0.2\n0.2 x 50 = $<<0.2*50=10>>10\n#### 10"},
    {"question": "Q2: a big sum", "answer": "It is 1,000 + 234 = 1,234\n#### 1,234"},
    {"question": "Q3: a loss", "answer": "5 - 8 = -3\n#### -3"},
]


def write_jsonl(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.fixture
def gsm8k_jsonl(tmp_path):
    return write_jsonl(tmp_path / "mini.jsonl", [json.dumps(record) for record in RECORDS])


def annotated_record(index: int, reasoning: str | None = None) -> dict:
    return {
        "question": f"question {index}",
        "reasoning_with_compression": reasoning or f"Step one gives {index}. <COMP>\n\nSo the answer is {index}.\n#### {index}",
        "answer": str(index),
    }


@pytest.fixture
def annotated_file(tmp_path):
    path = tmp_path / "annotated.json"
    path.write_text(json.dumps([annotated_record(index) for index in range(20)]), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------
# GSM8K


def test_gsm8k_jsonl_fields(gsm8k_jsonl):
    problems = load_gsm8k(str(gsm8k_jsonl))
    assert [problem.id for problem in problems] == ["mini-00000", "mini-00001", "mini-00002", "mini-00003"]
    assert [problem.gold for problem in problems] == ["72", "10", "1234", "-3"]
    assert problems[0].question == RECORDS[0]["question"]
    assert problems[0].reference == RECORDS[0]["answer"]


def test_gsm8k_json_list(tmp_path):
    path = tmp_path / "mini.json"
    path.write_text(json.dumps(RECORDS), encoding="utf-8")
    problems = load_gsm8k(str(path))
    assert len(problems) == 4
    assert problems[2].gold == "1234"


def test_gsm8k_offset_limit_keep_ids(gsm8k_jsonl):
    problems = load_gsm8k(str(gsm8k_jsonl), offset=1, limit=2)
    assert [problem.id for problem in problems] == ["mini-00001", "mini-00002"]
    assert len(load_gsm8k(str(gsm8k_jsonl), offset=3, limit=10)) == 1
    assert len(load_gsm8k(str(gsm8k_jsonl), limit=None)) == 4


def test_gsm8k_blank_lines_skipped(tmp_path):
    path = write_jsonl(tmp_path / "blank.jsonl", [json.dumps(RECORDS[0]), "", "  ", json.dumps(RECORDS[1])])
    assert [problem.gold for problem in load_gsm8k(str(path))] == ["72", "10"]


def test_gsm8k_missing_path(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(UserError, match="not found") as caught:
        load_gsm8k(str(missing))
    assert str(missing) in str(caught.value)
    assert "\n" not in str(caught.value)


def test_gsm8k_malformed_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [json.dumps(RECORDS[0]), '{"question": "cut off', json.dumps(RECORDS[1])])
    with pytest.raises(UserError, match="line 2") as caught:
        load_gsm8k(str(path))
    assert str(path) in str(caught.value)


def test_gsm8k_malformed_json_list(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[{"question": "q", "answer": "#### 1"},', encoding="utf-8")
    with pytest.raises(UserError, match="invalid JSON"):
        load_gsm8k(str(path))


def test_gsm8k_json_not_a_list(tmp_path):
    path = tmp_path / "object.json"
    path.write_text(json.dumps(RECORDS[0]), encoding="utf-8")
    with pytest.raises(UserError, match="expected a JSON list"):
        load_gsm8k(str(path))


@pytest.mark.parametrize("field", ["question", "answer"])
def test_gsm8k_missing_field(tmp_path, field):
    broken = dict(RECORDS[1])
    del broken[field]
    path = write_jsonl(tmp_path / "field.jsonl", [json.dumps(RECORDS[0]), json.dumps(broken)])
    with pytest.raises(UserError, match=f"record 1 has no string field '{field}'"):
        load_gsm8k(str(path))


def test_gsm8k_record_not_object(tmp_path):
    path = write_jsonl(tmp_path / "list.jsonl", [json.dumps(RECORDS[0]), "[1, 2]"])
    with pytest.raises(UserError, match="record 1 is a list"):
        load_gsm8k(str(path))


def test_gsm8k_answer_without_marker(tmp_path):
    records = [RECORDS[0], {"question": "q", "answer": "It is 5."}]
    path = write_jsonl(tmp_path / "nomark.jsonl", [json.dumps(record) for record in records])
    with pytest.raises(UserError, match="record 1 has an answer without a final '#### N' line"):
        load_gsm8k(str(path))


def test_gsm8k_empty_file(tmp_path):
    path = write_jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(UserError, match="no problems found"):
        load_gsm8k(str(path))


def test_gsm8k_empty_after_range(gsm8k_jsonl):
    with pytest.raises(UserError, match="no problems left"):
        load_gsm8k(str(gsm8k_jsonl), offset=4)
    with pytest.raises(UserError, match="no problems left"):
        load_gsm8k(str(gsm8k_jsonl), limit=0)


@pytest.mark.parametrize("offset,limit,name", [(-1, None, "offset"), (0, -2, "limit")])
def test_gsm8k_negative_range(gsm8k_jsonl, offset, limit, name):
    with pytest.raises(UserError, match=f"{name} must be 0 or more"):
        load_gsm8k(str(gsm8k_jsonl), offset=offset, limit=limit)


def test_gsm8k_unsupported_suffix(tmp_path):
    path = tmp_path / "mini.csv"
    path.write_text("question,answer\n", encoding="utf-8")
    with pytest.raises(UserError, match="unsupported file type '.csv'"):
        load_gsm8k(str(path))


def test_gsm8k_hub_without_datasets(monkeypatch):
    # A None entry in sys.modules makes `import datasets` raise ImportError.
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(UserError, match="pass a local GSM8K .jsonl file"):
        load_gsm8k("openai/gsm8k")


def test_gsm8k_hub_offline(monkeypatch):
    def load_dataset(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub (LocalEntryNotFoundError)")

    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    with pytest.raises(UserError, match="when offline, pass a local GSM8K .jsonl file"):
        load_gsm8k("openai/gsm8k")


def test_gsm8k_hub_dataset_not_found(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def load_dataset(*args, **kwargs):
        raise datasets.exceptions.DatasetNotFoundError("Dataset 'openai/gsm8k' doesn't exist on the Hub or cannot be accessed.")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    with pytest.raises(UserError, match="could not load openai/gsm8k split 'test' from the Hub"):
        load_gsm8k("openai/gsm8k")


def test_gsm8k_hub_split_ids(monkeypatch):
    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        return RECORDS

    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    problems = load_gsm8k("openai/gsm8k", offset=2, split="train")
    assert calls == [("openai/gsm8k", "main", "train")]
    assert [problem.id for problem in problems] == ["train-00002", "train-00003"]


def test_gsm8k_real_test_file(shared_data):
    problems = load_gsm8k(str(shared_data / "gsm8k" / "test.jsonl"))
    assert len(problems) == 1319
    assert problems[12].id == "test-00012"
    assert problems[0].gold == "18"
    assert len(load_gsm8k(str(shared_data / "gsm8k" / "test.jsonl"), limit=200)) == 200


# ---------------------------------------------------------------------------
# Annotated reasoning


def test_steps_split_at_markers():
    example = AnnotatedExample(
        id="x",
        question="q",
        reasoning="May = 48 / 2 = 24 <COMP>\n\nTotal = 48 + 24 = 72 <COMP> \n\nFinal answer: #### 72",
        answer="72",
    )
    assert example.steps() == ["May = 48 / 2 = 24", "\n\nTotal = 48 + 24 = 72", "\n\nFinal answer: #### 72"]
    assert example.num_markers == 2


def test_steps_marker_without_spaces():
    example = AnnotatedExample(id="x", question="q", reasoning="a = 1<COMP>b = 2\t<COMP>\n #### 2", answer="2")
    assert example.steps() == ["a = 1", "b = 2", "\n #### 2"]


def test_steps_without_marker():
    example = AnnotatedExample(id="x", question="q", reasoning="It is 5.\n#### 5", answer="5")
    assert example.steps() == ["It is 5.\n#### 5"]


def test_annotated_load_fields(annotated_file):
    examples = load_annotated(annotated_file)
    assert len(examples) == 20
    assert examples[3].id == "comp-00003"
    assert examples[3].question == "question 3"
    assert examples[3].answer == "3"
    assert examples[3].original_reasoning is None
    assert examples[3].steps()[-1].endswith("#### 3")


def test_annotated_id_field_and_answer_normalized(tmp_path):
    record = dict(annotated_record(0), id="train-00007", answer="1,080", original_reasoning="#### 1080")
    path = tmp_path / "ids.json"
    path.write_text(json.dumps([record]), encoding="utf-8")
    (example,) = load_annotated(path)
    assert example.id == "train-00007"
    assert example.answer == "1080"
    assert example.original_reasoning == "#### 1080"


def test_annotated_missing_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_annotated(tmp_path / "absent.json")


@pytest.mark.parametrize(
    "content,message",
    [
        ("{}", "expected a JSON list"),
        ("[]", "the list is empty"),
        ("[1, 2", "invalid JSON"),
        ('["text"]', "record 0 is a str"),
        ('{"question": "q", "answer": "#### 1"}\n{"question": "r", "answer": "#### 2"}\n', "looks like JSON Lines"),
    ],
)
def test_annotated_invalid_file(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError, match=message):
        load_annotated(path)


@pytest.mark.parametrize("field", ["question", "reasoning_with_compression", "answer"])
def test_annotated_missing_field(tmp_path, field):
    records = [annotated_record(index) for index in range(3)]
    del records[2][field]
    path = tmp_path / "missing.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    with pytest.raises(UserError, match=f"record 2 has no field '{field}'"):
        load_annotated(path)


def test_annotated_answer_not_number(tmp_path):
    path = tmp_path / "answer.json"
    path.write_text(json.dumps([dict(annotated_record(0), answer="many")]), encoding="utf-8")
    with pytest.raises(UserError, match="record 0 has answer 'many', which is not a number"):
        load_annotated(path)


def test_annotated_duplicate_ids(tmp_path):
    records = [dict(annotated_record(index), id="same") for index in range(2)]
    path = tmp_path / "dup.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    with pytest.raises(UserError, match="records 0 and 1 share the id 'same'"):
        load_annotated(path)


def test_annotated_no_marker_warns(tmp_path, caplog):
    records = [annotated_record(0), annotated_record(1, reasoning="It is 1.\n#### 1")]
    path = tmp_path / "nomarker.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="dyncomp.data.annotated"):
        examples = load_annotated(path)
    assert len(examples) == 2
    assert "1 of 2 records have no <COMP> marker" in caplog.text


def test_annotated_wrong_answer_warns(tmp_path, caplog):
    records = [annotated_record(0), dict(annotated_record(1), answer="2")]
    path = tmp_path / "wrong.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="dyncomp.data.annotated"):
        load_annotated(path)
    assert "1 of 2 records reason to a final answer that differs" in caplog.text


def test_save_load_round_trip(tmp_path, annotated_file):
    examples = load_annotated(annotated_file)
    examples[0].original_reasoning = "48/2 = 24\n#### 24"
    out = save_annotated(examples, tmp_path / "nested" / "copy.json")
    assert load_annotated(out) == examples
    assert [path.name for path in out.parent.iterdir()] == ["copy.json"]


def test_save_dicts_in_file_format(tmp_path):
    out = save_annotated([annotated_record(5)], tmp_path / "dicts.json")
    assert json.loads(out.read_text(encoding="utf-8")) == [annotated_record(5)]


def test_save_rejects_incomplete_dict(tmp_path):
    with pytest.raises(ValueError, match="record 0 has no field 'answer'"):
        save_annotated([{"question": "q", "reasoning_with_compression": "r"}], tmp_path / "x.json")


def test_save_failure_keeps_old_file(tmp_path):
    out = save_annotated([annotated_record(1)], tmp_path / "keep.json")
    with pytest.raises(TypeError):
        save_annotated([dict(annotated_record(2), answer=object())], out)
    assert json.loads(out.read_text(encoding="utf-8")) == [annotated_record(1)]
    assert [path.name for path in tmp_path.iterdir()] == ["keep.json"]


def synthetic_examples(count: int) -> list[AnnotatedExample]:
    return [AnnotatedExample(id=f"comp-{index:05d}", question="q", reasoning="r <COMP> #### 1", answer="1") for index in range(count)]


def test_split_sizes_and_disjoint():
    examples = synthetic_examples(1000)
    splits = {name: split_annotated(examples, name) for name in ("train", "validation", "test")}
    assert {name: len(part) for name, part in splits.items()} == {"train": 900, "validation": 50, "test": 50}
    ids = {name: {example.id for example in part} for name, part in splits.items()}
    assert not ids["train"] & ids["validation"]
    assert not ids["train"] & ids["test"]
    assert not ids["validation"] & ids["test"]
    assert ids["train"] | ids["validation"] | ids["test"] == {example.id for example in examples}


def test_split_keeps_file_order():
    part = split_annotated(synthetic_examples(100), "train")
    assert [example.id for example in part] == sorted(example.id for example in part)


# Python promises a stable sequence across versions for `random()` only, not for
# `shuffle`, so these ids pin the split. A change here means every earlier split moved.
PINNED_VALIDATION_SEED0 = ["comp-00006", "comp-00034", "comp-00054", "comp-00109", "comp-00124"]


def test_split_pinned_ids():
    validation = split_annotated(synthetic_examples(1000), "validation")
    assert [example.id for example in validation[:5]] == PINNED_VALIDATION_SEED0


def test_split_seed_changes_split():
    examples = synthetic_examples(1000)
    assert split_annotated(examples, "test", seed=0) == split_annotated(examples, "test", seed=0)
    assert split_annotated(examples, "test", seed=0) != split_annotated(examples, "test", seed=1)


def test_split_small_list_rounds_half_up():
    examples = synthetic_examples(10)
    assert len(split_annotated(examples, "validation")) == 1
    assert len(split_annotated(examples, "test")) == 1
    assert len(split_annotated(examples, "train")) == 8
    assert split_annotated(examples, "all") == examples


def test_split_unknown_name():
    with pytest.raises(UserError, match="unknown split 'dev'; choose one of train, validation, test, all"):
        split_annotated(synthetic_examples(10), "dev")


def test_annotated_real_file(shared_data):
    examples = load_annotated(shared_data / "gsm8k-comp" / "gsm8k_compressed_train.json")
    assert len(examples) == 1000
    assert examples[42].id == "comp-00042"
    assert all(example.num_markers > 0 for example in examples)
    first = examples[0]
    assert first.steps()[0].endswith("= 48 / 2 = 24")
    assert first.steps()[1].startswith("\n\nNow, we have")
    assert first.steps()[-1].endswith("#### 72")
    assert len(first.steps()) == first.num_markers + 1


def test_annotated_real_file_splits(shared_data):
    examples = load_annotated(shared_data / "gsm8k-comp" / "gsm8k_compressed_train.json")
    splits = {name: split_annotated(examples, name) for name in ("train", "validation", "test")}
    assert [len(splits[name]) for name in ("train", "validation", "test")] == [900, 50, 50]
    ids = [example.id for part in splits.values() for example in part]
    assert len(set(ids)) == 1000
    again = split_annotated(load_annotated(shared_data / "gsm8k-comp" / "gsm8k_compressed_train.json"), "test")
    assert [example.id for example in again] == [example.id for example in splits["test"]]
