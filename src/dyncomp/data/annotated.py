"""Reasoning annotated with `<COMP>` markers at step boundaries: load, split and save.

The file format is a JSON list of objects with `question`, `reasoning_with_compression`
(reasoning with `<COMP>` markers that ends in `#### N`), `answer` (the number), and
optionally `original_reasoning` (the GSM8K reference) and `id`.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from dyncomp.data.gsm8k import is_correct, normalize_number
from dyncomp.errors import UserError
from dyncomp.models.tokens import COMP_MARKER

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test", "all")
HELD_OUT_FRACTION = 0.05
"""The share of examples in each of the validation and test splits."""

REQUIRED_FIELDS = ("question", "reasoning_with_compression", "answer")

# Spaces and tabs around a marker belong to neither step, but newlines stay with the
# step that follows.
_STEP_BOUNDARY = re.compile(r"[ \t]*" + re.escape(COMP_MARKER) + r"[ \t]*")


@dataclass
class AnnotatedExample:
    """One problem with `<COMP>`-annotated reasoning."""

    id: str
    """The record's `id` field when present, else "comp-" and its index in the file, e.g. "comp-00042"."""
    question: str
    reasoning: str
    """The reasoning text with `<COMP>` markers, ending in `#### N`."""
    answer: str
    """The normalized final answer."""
    original_reasoning: str | None = None

    def steps(self) -> list[str]:
        """Split the reasoning at the markers into steps, markers removed.

        A step ends right before the spaces or tabs that precede its marker, and spaces or
        tabs right after a marker are dropped too. Newlines are kept, so a step after the
        first starts with the newline(s) that followed the marker in the text. The last
        element is the text after the last marker (the conclusion with `#### N`), and
        the list has one element when there is no marker.
        """
        return _STEP_BOUNDARY.split(self.reasoning)

    @property
    def num_markers(self) -> int:
        return self.reasoning.count(COMP_MARKER)

    def to_dict(self) -> dict:
        """Return the record in the file format."""
        record = {
            "id": self.id,
            "question": self.question,
            "reasoning_with_compression": self.reasoning,
            "answer": self.answer,
        }
        if self.original_reasoning is not None:
            record["original_reasoning"] = self.original_reasoning
        return record


def load_annotated(path: str | Path) -> list[AnnotatedExample]:
    """Load annotated reasoning from a JSON list, raising UserError on any invalid record.

    Records without a marker, and records whose reasoning ends in another number than
    their `answer`, are kept, and their numbers are logged as warnings.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"annotated reasoning file not found: {path}; pass a JSON list such as `dyncomp annotate` writes")
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        hint = ""
        if error.msg == "Extra data" and error.colno == 1:
            hint = "; this looks like JSON Lines (one object per line, as GSM8K's files are), but annotated reasoning is one JSON list"
        raise UserError(f"{path}: invalid JSON at line {error.lineno}, column {error.colno} ({error.msg}){hint}") from None
    if not isinstance(records, list):
        raise UserError(f"{path}: expected a JSON list of objects, got {type(records).__name__}")
    if not records:
        raise UserError(f"{path}: the list is empty; pass a file with at least one annotated record")

    examples = [_to_example(record, index, path) for index, record in enumerate(records)]
    _check_unique_ids(examples, path)

    without_marker = sum(1 for example in examples if example.num_markers == 0)
    if without_marker:
        logger.warning("%s: %d of %d records have no %s marker", path, without_marker, len(examples), COMP_MARKER)
    # LLM rewrites sometimes reach a wrong result, so this is reported but not rejected.
    wrong_answer = sum(1 for example in examples if not is_correct(example.reasoning, example.answer))
    if wrong_answer:
        logger.warning(
            "%s: %d of %d records reason to a final answer that differs from their answer field",
            path,
            wrong_answer,
            len(examples),
        )
    logger.info("loaded %d annotated examples from %s", len(examples), path)
    return examples


def _to_example(record: object, index: int, path: Path) -> AnnotatedExample:
    if not isinstance(record, dict):
        raise UserError(f"{path}: record {index} is a {type(record).__name__}, expected an object")
    for field in REQUIRED_FIELDS:
        if field not in record:
            raise UserError(f"{path}: record {index} has no field {field!r}; every record needs {', '.join(REQUIRED_FIELDS)}")
    for field in ("question", "reasoning_with_compression"):
        if not isinstance(record[field], str):
            raise UserError(f"{path}: record {index} field {field!r} is a {type(record[field]).__name__}, expected a string")

    answer = normalize_number(str(record["answer"]))
    if answer is None:
        raise UserError(f"{path}: record {index} has answer {record['answer']!r}, which is not a number")
    original = record.get("original_reasoning")
    return AnnotatedExample(
        id=str(record["id"]) if "id" in record else f"comp-{index:05d}",
        question=record["question"],
        reasoning=record["reasoning_with_compression"],
        answer=answer,
        original_reasoning=original if isinstance(original, str) else None,
    )


def _check_unique_ids(examples: list[AnnotatedExample], path: Path) -> None:
    seen: dict[str, int] = {}
    for index, example in enumerate(examples):
        if example.id in seen:
            raise UserError(f"{path}: records {seen[example.id]} and {index} share the id {example.id!r}; ids must be unique")
        seen[example.id] = index


def split_annotated(examples: list[AnnotatedExample], split: str, seed: int = 0) -> list[AnnotatedExample]:
    """Return one split of `examples` in their original order.

    The split depends only on the number of examples and `seed`: `random.Random(seed)`
    shuffles the indices, which gives the same order on every platform. Python does not
    promise the same `shuffle` across versions, so the tests pin a few ids. Validation and test take 5% each, rounded half up, and train the rest,
    so 1,000 examples give 900 / 50 / 50. "all" returns every example.
    """
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if split == "all":
        return list(examples)

    indices = list(range(len(examples)))
    random.Random(seed).shuffle(indices)
    held_out = int(len(examples) * HELD_OUT_FRACTION + 0.5)
    ranges = {
        "validation": indices[:held_out],
        "test": indices[held_out : 2 * held_out],
        "train": indices[2 * held_out :],
    }
    return [examples[index] for index in sorted(ranges[split])]


def save_annotated(examples: Iterable[AnnotatedExample | dict], path: str | Path) -> Path:
    """Write examples, or records already in the file format, as a JSON list.

    Raises ValueError when a record lacks a required field. The file is written to a temporary name and then renamed, so an interrupted write
    leaves any earlier file whole. Returns the path written.
    """
    path = Path(path)
    records = [example.to_dict() if isinstance(example, AnnotatedExample) else dict(example) for example in examples]
    for index, record in enumerate(records):
        missing = [field for field in REQUIRED_FIELDS if field not in record]
        if missing:
            raise ValueError(f"record {index} has no field {missing[0]!r}; records need {', '.join(REQUIRED_FIELDS)}")

    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, prefix=path.name, suffix=".tmp", delete=False)
    try:
        with handle:
            json.dump(records, handle, ensure_ascii=False, indent=2)
            handle.write("\n")
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise
    logger.info("wrote %d annotated records to %s", len(records), path)
    return path
