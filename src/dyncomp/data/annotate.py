"""Annotate GSM8K reasoning with `<COMP>` markers, by rule or by an LLM rewrite.

The `rules` method puts a marker after each line of GSM8K's reference solution. The
`llm` method sends the reference to an OpenAI-compatible chat completions endpoint for a
step-by-step rewrite with markers, and keeps a progress file so that a rerun resumes.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from tqdm.auto import tqdm

from dyncomp.data.annotated import save_annotated
from dyncomp.data.gsm8k import Problem, extract_answer, is_correct, load_gsm8k
from dyncomp.errors import UserError
from dyncomp.models.tokens import COMP_MARKER

logger = logging.getLogger(__name__)

METHODS = ("rules", "llm")
RECORD_FIELDS = ("id", "question", "reasoning_with_compression", "answer", "original_reasoning")
API_KEY_ENV = "OPENAI_API_KEY"
# Besides 5xx, the HTTP status codes that the openai client retries by itself
# (`BaseClient._should_retry` in openai-python 3.63).
RETRIED_STATUS = (408, 409, 429)
_CALCULATOR_ANNOTATION = re.compile(r"<<[^<>]*>>")
_CODE_FENCE = re.compile(r"^```[\w-]*\n(?P<body>.*)\n```$", re.DOTALL)


@dataclass
class AnnotateConfig:
    """Settings of one `dyncomp annotate` run. The CLI takes its defaults from here."""

    input: str
    """A GSM8K .jsonl or .json file, or "openai/gsm8k" (its train split) when online."""
    out: str
    """The output .json file."""
    method: str = "rules"
    offset: int = 0
    limit: int | None = None
    api_base: str | None = None
    """Base URL of an OpenAI-compatible API, e.g. http://127.0.0.1:8000/v1 (llm only)."""
    api_model: str | None = None
    concurrency: int = 4
    """Requests in flight at once (llm only)."""
    max_retries: int = 5
    """Retries per request on a timeout, a connection error, HTTP 408, 409, 429 or 5xx, with exponential backoff."""
    timeout: float = 120.0
    """Seconds before one request times out."""
    retry_rejected: bool = False
    """Query again the problems whose earlier rewrite was rejected."""
    temperature: float | None = 0.0
    """Sampling temperature sent with each request, or None to send none (llm only)."""

    def validate(self) -> None:
        """Raise UserError for a setting that cannot work, naming the CLI option."""
        if self.method not in METHODS:
            raise UserError(f"unknown annotation method {self.method!r}; choose one of {', '.join(METHODS)}")
        if Path(self.out).suffix != ".json":
            raise UserError(f"--out {self.out}: the output is a JSON list, so the file name must end in .json")
        if self.method != "llm":
            return
        if not self.api_base:
            raise UserError("--method llm needs --api-base, e.g. http://127.0.0.1:8000/v1 for a local server")
        if not self.api_base.startswith(("http://", "https://")):
            raise UserError(f"--api-base {self.api_base!r} is not an http(s) URL; pass e.g. http://127.0.0.1:8000/v1")
        if not self.api_model:
            raise UserError("--method llm needs --api-model, the model name the endpoint serves")
        if self.concurrency < 1:
            raise UserError(f"--concurrency must be at least 1, got {self.concurrency}")
        if self.max_retries < 0:
            raise UserError(f"--max-retries must be 0 or more, got {self.max_retries}")
        if self.timeout <= 0:
            raise UserError(f"--timeout must be a positive number of seconds, got {self.timeout}")


@dataclass
class AnnotateSummary:
    """Counts of one annotation run."""

    out: Path
    written: int
    rejected: int = 0
    reused: int = 0
    """Problems finished by an earlier run and not queried again."""
    queried: int = 0
    without_marker: int = 0
    progress: Path | None = None
    rejection_reasons: Counter = field(default_factory=Counter)


def annotate(config: AnnotateConfig) -> AnnotateSummary:
    """Annotate the selected problems of `config.input` and write `config.out`."""
    config.validate()
    # Annotated reasoning is training data, so the Hub's train split is read; files have no split.
    problems = load_gsm8k(config.input, offset=config.offset, limit=config.limit, split="train")

    if config.method == "rules":
        records = [annotate_rules(problem) for problem in problems]
        summary = AnnotateSummary(out=Path(config.out), written=len(records))
    else:
        records, summary = _annotate_llm(problems, config)

    summary.without_marker = sum(1 for record in records if COMP_MARKER not in record["reasoning_with_compression"])
    if summary.without_marker:
        logger.warning("%d of %d annotated records have no %s marker", summary.without_marker, len(records), COMP_MARKER)
    save_annotated(records, config.out)
    return summary


def annotate_rules(problem: Problem) -> dict:
    """Return the record that marks each line of the reference solution as one step.

    Calculator annotations such as `<<48/2=24>>` are removed, each non-empty line before
    `####` gets " <COMP>" at its end, and the record ends with `#### N`.
    """
    body, _, _ = problem.reference.rpartition("####")
    lines = [_CALCULATOR_ANNOTATION.sub("", line).strip() for line in body.splitlines()]
    steps = [f"{line} {COMP_MARKER}" for line in lines if line]
    return _record(problem, "\n".join(steps + [f"#### {problem.gold}"]))


def _record(problem: Problem, reasoning: str) -> dict:
    values = (problem.id, problem.question, reasoning, problem.gold, problem.reference)
    return dict(zip(RECORD_FIELDS, values))


def progress_path(out: str | Path) -> Path:
    """Return the progress file of an output: "x.json" has "x.partial.jsonl" next to it."""
    out = Path(out)
    return out.with_name(f"{out.stem}.partial.jsonl")


# ---------------------------------------------------------------------------
# The LLM rewrite: prompt and check

SYSTEM_PROMPT = f"""\
You rewrite solutions of grade-school math problems as step-by-step reasoning with \
{COMP_MARKER} markers. The reasoning trains a model that, at each {COMP_MARKER}, replaces \
the finished step by a short summary. So every step must state in words the quantity \
it computed, with its number and unit, because later steps see only that summary.

Rules:
1. Follow the logic of the reference solution and reach exactly its final answer.
2. Write one step per intermediate result: say what is computed, show the calculation, \
and state the result with its meaning, e.g. "Natalia sold 48 / 2 = 24 clips in May."
3. End every step with a space and {COMP_MARKER} on the same line, then a blank line.
4. After the last step, write one sentence that states the answer, then a last line \
"#### N", where N is the final number alone: no unit, no $ sign, no thousands separators.
5. Put no {COMP_MARKER} after the "####" line. Reply with the reasoning only, \
with no preamble and no code fences."""

_EXAMPLE_PROBLEM = Problem(
    id="example",
    question=(
        "A baker made 36 muffins and sold 3/4 of them in the morning. In the afternoon she "
        "baked 20 more. How many muffins does she have now?"
    ),
    reference=(
        "She sold 36 * 3/4 = <<36*3/4=27>>27 muffins.\n"
        "She had 36 - 27 = <<36-27=9>>9 muffins left.\n"
        "After baking she has 9 + 20 = <<9+20=29>>29 muffins.\n"
        "#### 29"
    ),
    gold="29",
)
_EXAMPLE_REWRITE = f"""\
The baker sold 3/4 of her 36 muffins in the morning, which is 36 * 3/4 = 27 muffins sold. {COMP_MARKER}

She had 36 - 27 = 9 muffins left after the morning sales. {COMP_MARKER}

She baked 20 more in the afternoon, so she now has 9 + 20 = 29 muffins. {COMP_MARKER}

The baker has 29 muffins now.
#### 29"""


def build_messages(problem: Problem) -> list[dict]:
    """Return the chat messages that ask for a rewrite of `problem`'s reference solution."""
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": _user_message(_EXAMPLE_PROBLEM)},
        {"role": "assistant", "content": _EXAMPLE_REWRITE},
        {"role": "user", "content": _user_message(problem)},
    ]


def _user_message(problem: Problem) -> str:
    body, _, _ = problem.reference.rpartition("####")
    reference = _CALCULATOR_ANNOTATION.sub("", body).strip()
    return (
        f"Problem:\n{problem.question}\n\n"
        f"Reference solution:\n{reference}\n\n"
        f"Final answer: {problem.gold}\n\n"
        f"Rewrite the solution with {COMP_MARKER} markers."
    )


def clean_response(text: str | None) -> str:
    """Return the model's reply without surrounding whitespace or a code fence around it all."""
    text = (text or "").strip()
    fenced = _CODE_FENCE.match(text)
    return fenced.group("body").strip() if fenced else text


def check_rewrite(text: str, gold: str) -> tuple[str, str] | None:
    """Return (reason, detail) when a rewrite is unusable, or None when it is accepted."""
    if not text:
        return "empty response", "the endpoint returned no text"
    if COMP_MARKER not in text:
        return "no marker", f"the rewrite contains no {COMP_MARKER}"
    if "####" not in text:
        return "no final line", "the rewrite has no '#### N' line"
    if not is_correct(text, gold):
        return "wrong answer", f"final answer {extract_answer(text)} differs from the reference answer {gold}"
    return None


# ---------------------------------------------------------------------------
# The LLM run: progress file, thread pool, failure handling


def _annotate_llm(problems: list[Problem], config: AnnotateConfig) -> tuple[list[dict], AnnotateSummary]:
    openai = _import_openai()
    api_key = os.environ.get(API_KEY_ENV)
    if not api_key:
        raise UserError(
            f"--method llm needs the environment variable {API_KEY_ENV}; "
            "set it to your API key, or to any string for a local server that checks none"
        )

    progress = progress_path(config.out)
    entries = _read_progress(progress, problems)
    todo = [problem for problem in problems if _needs_query(entries.get(problem.id), config.retry_rejected)]
    reused = len(problems) - len(todo)
    if reused:
        logger.info("resuming from %s: %d of %d problems already finished", progress, reused, len(problems))

    client = openai.OpenAI(
        base_url=config.api_base,
        api_key=api_key,
        max_retries=config.max_retries,
        timeout=config.timeout,
    )
    failure = _query_all(client, openai.APIError, todo, config, progress, entries)
    if failure is not None:
        raise UserError(_failure_message(failure, openai, config, progress))

    records, reasons = [], Counter()
    for problem in problems:
        entry = entries[problem.id]
        if entry["status"] == "ok":
            records.append({name: entry[name] for name in RECORD_FIELDS})
        else:
            reasons[entry["reason"]] += 1
    rejected = sum(reasons.values())
    if rejected:
        details = ", ".join(f"{count} {reason}" for reason, count in reasons.most_common())
        logger.warning("rejected %d of %d rewrites (%s); the reasons are in %s", rejected, len(problems), details, progress)

    summary = AnnotateSummary(
        out=Path(config.out),
        written=len(records),
        rejected=rejected,
        reused=reused,
        queried=len(todo),
        progress=progress,
        rejection_reasons=reasons,
    )
    return records, summary


def _import_openai():
    try:
        import openai
    except ImportError:
        raise UserError("--method llm needs the openai package; install it with pip install 'dyncomp[llm]'") from None
    return openai


def _needs_query(entry: dict | None, retry_rejected: bool) -> bool:
    if entry is None:
        return True
    return retry_rejected and entry["status"] == "rejected"


def _read_progress(progress: Path, problems: list[Problem]) -> dict[str, dict]:
    """Return the latest progress entry of each id; unreadable lines are skipped with a warning.

    A crash in the middle of a write leaves a partial last line, which is why invalid
    lines are not an error. Their problems are queried again.
    """
    if not progress.is_file():
        return {}
    questions = {problem.id: problem.question for problem in problems}
    entries: dict[str, dict] = {}
    invalid = 0
    with progress.open(encoding="utf-8") as handle:
        for line in handle:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                invalid += 1
                continue
            if not _is_valid_entry(entry):
                invalid += 1
                continue
            expected_question = questions.get(entry["id"])
            if expected_question is not None and entry["question"] != expected_question:
                raise UserError(
                    f"{progress} was written for another input: its record {entry['id']} has a different question; "
                    "delete that file or choose another --out"
                )
            entries[entry["id"]] = entry
    if invalid:
        logger.warning("%s: skipped %d unreadable lines; their problems are queried again", progress, invalid)
    return entries


def _is_valid_entry(entry: object) -> bool:
    if not isinstance(entry, dict) or not isinstance(entry.get("id"), str) or not isinstance(entry.get("question"), str):
        return False
    if entry.get("status") == "ok":
        return all(isinstance(entry.get(name), str) for name in RECORD_FIELDS)
    return entry.get("status") == "rejected" and isinstance(entry.get("reason"), str)


def _query_all(client, api_error: type, todo: list[Problem], config: AnnotateConfig, progress: Path, entries: dict) -> Exception | None:
    """Query the endpoint for each problem and append each result to the progress file.

    Returns the first API error after the client's own retries, or None. After an error
    no new request starts, but requests already in flight still finish and are recorded.
    """
    if not todo:
        return None
    failure = None
    progress.parent.mkdir(parents=True, exist_ok=True)
    with _open_for_append(progress) as log, ThreadPoolExecutor(max_workers=config.concurrency) as pool:
        futures: dict[Future, Problem] = {pool.submit(_request_rewrite, client, config, problem): problem for problem in todo}
        try:
            for future in tqdm(as_completed(futures), total=len(futures), desc="annotate", unit="problem"):
                if future.cancelled():
                    continue
                problem = futures[future]
                try:
                    response = future.result()
                except api_error as error:
                    logger.error("request for %s failed: %s", problem.id, error)
                    if failure is None:
                        failure = error
                        _cancel(futures)
                    continue
                entry = _entry(problem, response)
                log.write(json.dumps(entry, ensure_ascii=False) + "\n")
                log.flush()
                entries[problem.id] = entry
        finally:
            # On Ctrl-C or a bug, stop queued requests instead of waiting for all of them.
            _cancel(futures)
    return failure


def _open_for_append(path: Path) -> IO[str]:
    # A crash mid-write can leave a last line without its newline. A fresh line keeps the
    # next entry from being glued to it.
    needs_newline = False
    if path.is_file() and path.stat().st_size > 0:
        with path.open("rb") as existing:
            existing.seek(-1, os.SEEK_END)
            needs_newline = existing.read(1) != b"\n"
    handle = path.open("a", encoding="utf-8")
    if needs_newline:
        handle.write("\n")
    return handle


def _cancel(futures: dict[Future, Problem]) -> None:
    for future in futures:
        future.cancel()


def _request_rewrite(client, config: AnnotateConfig, problem: Problem) -> str:
    options = {} if config.temperature is None else {"temperature": config.temperature}
    completion = client.chat.completions.create(model=config.api_model, messages=build_messages(problem), **options)
    if not completion.choices:
        return ""
    return completion.choices[0].message.content or ""


def _entry(problem: Problem, response: str) -> dict:
    text = clean_response(response)
    rejection = check_rewrite(text, problem.gold)
    if rejection is None:
        return {"status": "ok", **_record(problem, text)}
    reason, detail = rejection
    logger.debug("rejected the rewrite of %s: %s", problem.id, detail)
    return {
        "id": problem.id,
        "status": "rejected",
        "reason": reason,
        "detail": detail,
        "question": problem.question,
        "response": response,
    }


def _failure_message(error: Exception, openai, config: AnnotateConfig, progress: Path) -> str:
    resume_hint = f"records finished so far are kept in {progress}; rerun the same command to resume"
    status = getattr(error, "status_code", None)
    cause = _one_line(getattr(error, "message", None) or str(error))
    if isinstance(error, openai.APIStatusError) and status not in RETRIED_STATUS and status < 500:
        return (
            f"the endpoint {config.api_base} rejected the request with HTTP {status} ({cause}); "
            f"check --api-model, --api-base and {API_KEY_ENV}; {resume_hint}"
        )
    if status is not None:
        cause = f"HTTP {status}: {cause}"
    return f"the endpoint {config.api_base} failed after {config.max_retries} retries: {cause}; {resume_hint}"


def _one_line(text: str, limit: int = 200) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."
