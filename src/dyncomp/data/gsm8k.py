"""GSM8K problems: loading from a file or the Hub, and checking a model's final answer."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

from dyncomp.errors import UserError

logger = logging.getLogger(__name__)

HUB_ID = "openai/gsm8k"
ANSWER_TOLERANCE = Decimal("1e-6")

# A number as people and models write it: an optional sign, optional `$`, digits with
# optional thousands separators, an optional decimal part. No number starts right after a
# letter, digit, period or closing bracket, so "48-24" reads as 48 and 24 (not -24) and
# "m2" contains none.
_NUMBER = re.compile(
    r"(?<![\w.)\]])(?P<sign>[-\u2212])?\$?"
    r"(?P<digits>(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)"
)
# An explicit marker counts only when its number follows within this many characters,
# so "#### $18", "####: 35" and "The answer is: the total, 18" work but a marker with no
# number of its own does not pick one from a later sentence.
_MAX_GAP = 30
_HASH_MARKER = re.compile(r"####")
_ANSWER_IS = re.compile(r"\bthe\s+(?:final\s+)?answer\s+is\b", re.IGNORECASE)
_FINAL_ANSWER = re.compile(r"\bfinal\s+answer\s*:", re.IGNORECASE)
_BOXED = re.compile(r"\\boxed\s*\{")
# LaTeX spacing and escapes that appear inside `\boxed{...}`: "1{,}234", "1\,234", "\$18", "50\%".
_LATEX_CLEANUP = (("{,}", ","), ("\\,", ""), ("\\!", ""), ("\\$", "$"), ("\\%", "%"))


@dataclass
class Problem:
    """One GSM8K problem."""

    id: str
    """Source name and index in the source, e.g. "test-00012": stable across offsets and limits."""
    question: str
    reference: str
    """GSM8K's reference solution, with calculator annotations and the final `#### N` line."""
    gold: str
    """The normalized number after `####` in the reference."""


def normalize_number(text: str) -> str | None:
    """Return the first number in `text` in canonical form, or None when there is none.

    `$`, thousands separators, units, a trailing period and `%` are ignored, and trailing
    zeros of a decimal part are dropped: "$1,234.50" gives "1234.5", "10.00 dollars" "10".
    """
    match = _NUMBER.search(text)
    if match is None:
        return None
    return _canonical(match)


def _canonical(match: re.Match) -> str:
    digits = match.group("digits").replace(",", "")
    value = Decimal(digits)
    if match.group("sign"):
        value = -value
    if value == value.to_integral_value():
        return str(int(value))
    # `normalize` drops trailing zeros; format "f" avoids exponent notation such as "1E+2".
    return format(value.normalize(), "f")


def _number_after(text: str, start: int) -> str | None:
    match = _NUMBER.search(text, start)
    if match is None or match.start() - start > _MAX_GAP:
        return None
    return _canonical(match)


def _last_number_after_marker(text: str, marker: re.Pattern) -> str | None:
    # The last marker wins, so a restated or corrected answer replaces an earlier one.
    for match in reversed(list(marker.finditer(text))):
        number = _number_after(text, match.end())
        if number is not None:
            return number
    return None


def _boxed_contents(text: str) -> list[str]:
    """Return the contents of each `\\boxed{...}`, with nested braces kept balanced."""
    contents = []
    for match in _BOXED.finditer(text):
        depth = 1
        position = match.end()
        while position < len(text) and depth > 0:
            if text[position] == "{":
                depth += 1
            elif text[position] == "}":
                depth -= 1
            position += 1
        if depth == 0:
            contents.append(text[match.end() : position - 1])
    return contents


def _last_boxed_number(text: str) -> str | None:
    for content in reversed(_boxed_contents(text)):
        for latex, plain in _LATEX_CLEANUP:
            content = content.replace(latex, plain)
        number = normalize_number(content)
        if number is not None:
            return number
    return None


def extract_answer(text: str) -> str | None:
    """Return the final answer of a model's text as a normalized number, or None.

    The rules are tried in order, and the first that finds a number wins: `#### N`,
    `\\boxed{N}`, "the answer is N", "final answer: N" (case-insensitive), then the last
    number anywhere in the text. So a number written after an explicit marker, as in
    "#### 18\\nThat is 2 more than 16.", never replaces the marked answer. When a marker
    appears several times, its last occurrence that is followed by a number counts.
    """
    for find in (
        lambda: _last_number_after_marker(text, _HASH_MARKER),
        lambda: _last_boxed_number(text),
        lambda: _last_number_after_marker(text, _ANSWER_IS),
        lambda: _last_number_after_marker(text, _FINAL_ANSWER),
    ):
        number = find()
        if number is not None:
            return number

    matches = list(_NUMBER.finditer(text))
    return _canonical(matches[-1]) if matches else None


def is_correct(text: str, gold: str) -> bool:
    """Return whether the final answer of `text` equals `gold` within 1e-6 (absolute)."""
    predicted = extract_answer(text)
    expected = normalize_number(gold)
    if predicted is None or expected is None:
        return False
    return abs(Decimal(predicted) - Decimal(expected)) <= ANSWER_TOLERANCE


def load_gsm8k(source: str, offset: int = 0, limit: int | None = None, split: str = "test") -> list[Problem]:
    """Load GSM8K problems from a `.jsonl` file, a `.json` list, or the Hub id "openai/gsm8k".

    Each record needs `question` and `answer`, and the answer must end in `#### N`.
    `offset` and `limit` select a range after loading, and ids keep the index in the
    source. `split` is used only for the Hub. Raises UserError on any invalid input.
    """
    if offset < 0:
        raise UserError(f"offset must be 0 or more, got {offset}")
    if limit is not None and limit < 0:
        raise UserError(f"limit must be 0 or more, got {limit}")

    if source == HUB_ID:
        records, name = _read_hub(split), split
    else:
        path = Path(source)
        records, name = _read_file(path), path.stem
    if not records:
        raise UserError(f"{source}: no problems found; pass a GSM8K file with at least one record")

    problems = [_to_problem(record, index, name, source) for index, record in enumerate(records)]
    end = None if limit is None else offset + limit
    selected = problems[offset:end]
    if not selected:
        raise UserError(
            f"{source}: no problems left after --offset {offset} --limit {limit} ({len(problems)} in the source); "
            "lower the offset or raise the limit"
        )
    logger.info("loaded %d GSM8K problems from %s", len(selected), source)
    return selected


def _read_file(path: Path) -> list:
    if not path.is_file():
        raise UserError(
            f"GSM8K source not found: {path}; pass a .jsonl or .json file with question and answer fields, "
            f"or {HUB_ID} when online"
        )
    if path.suffix == ".jsonl":
        return _read_jsonl(path)
    if path.suffix == ".json":
        return _read_json_list(path)
    raise UserError(f"{path}: unsupported file type {path.suffix!r}; pass a .jsonl file (one object a line) or a .json list")


def _read_jsonl(path: Path) -> list:
    records = []
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise UserError(f"{path}, line {line_number}: invalid JSON ({error.msg}); fix or remove that line") from None
    return records


def _read_json_list(path: Path) -> list:
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise UserError(f"{path}: invalid JSON at line {error.lineno}, column {error.colno} ({error.msg})") from None
    if not isinstance(records, list):
        raise UserError(f"{path}: expected a JSON list of objects, got {type(records).__name__}")
    return records


def _read_hub(split: str) -> list:
    try:
        import datasets
    except ImportError:
        raise UserError(
            f"reading {HUB_ID} needs the datasets package (pip install 'dyncomp[hub]'); "
            "or pass a local GSM8K .jsonl file instead"
        ) from None

    try:
        dataset = datasets.load_dataset(HUB_ID, "main", split=split)
    # Offline, `datasets` raises subclasses of ConnectionError or FileNotFoundError. An
    # unknown split raises ValueError.
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(
            f"could not load {HUB_ID} split {split!r} from the Hub ({message}); "
            "when offline, pass a local GSM8K .jsonl file instead"
        ) from None
    return [dict(record) for record in dataset]


def _to_problem(record: object, index: int, name: str, source: str) -> Problem:
    if not isinstance(record, dict):
        raise UserError(f"{source}: record {index} is a {type(record).__name__}, expected an object with question and answer")
    for field in ("question", "answer"):
        if not isinstance(record.get(field), str):
            raise UserError(f"{source}: record {index} has no string field {field!r}; every record needs question and answer")

    reference = record["answer"]
    _, marker, final = reference.rpartition("####")
    gold = normalize_number(final) if marker else None
    if gold is None:
        raise UserError(f"{source}: record {index} has an answer without a final '#### N' line; GSM8K answers end in one")
    return Problem(id=f"{name}-{index:05d}", question=record["question"], reference=reference, gold=gold)
