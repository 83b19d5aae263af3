"""Per-sample records of an evaluation run, appended as they are made so that a rerun resumes."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from dyncomp.errors import UserError

logger = logging.getLogger(__name__)

SAMPLES_FILE = "samples.jsonl"
RUN_FILE = "run.json"


def read_records(path: Path) -> list[dict]:
    """Read a samples file, skipping a last line cut short by a crash (it is logged, not fatal)."""
    if not path.is_file():
        return []
    records = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            if number == len(lines):
                logger.warning("%s: line %d is incomplete (an interrupted write); that sample is run again", path, number)
                continue
            raise UserError(f"{path}: line {number} is not valid JSON ({error.msg}); fix or delete that line and rerun") from error
    return records


def append_records(path: Path, records: list[dict]) -> None:
    with path.open("a", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
        handle.flush()


def repair_tail(path: Path) -> None:
    """Cut an incomplete last line, so that appended records start on a line of their own."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        path.write_bytes(data[:cut])


def check_run_identity(out: Path, identity: dict, write: bool = True) -> None:
    """Reject an output folder made with other settings; with `write`, record the settings of a new run in `run.json`.

    The identity contains everything that changes a sample's record (model, compressor, classifier,
    data, decoding settings) and nothing that does not (batch size, device, methods list).
    """
    run_file = out / RUN_FILE
    if run_file.is_file():
        try:
            saved = json.loads(run_file.read_text())
        except json.JSONDecodeError as error:
            raise UserError(f"{run_file} is not valid JSON ({error.msg}); delete it only if {out} contains no records you need") from error
        differing = sorted(key for key in set(saved) | set(identity) if saved.get(key) != identity.get(key))
        if differing:
            shown = ", ".join(f"{key}: {saved.get(key)!r} there vs {identity.get(key)!r} now" for key in differing[:3])
            raise UserError(f"{out} was written with a different configuration ({shown}); choose another --out")
        return
    if not write:
        return
    out.mkdir(parents=True, exist_ok=True)
    run_file.write_text(json.dumps(identity, indent=2))
