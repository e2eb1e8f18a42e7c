"""metrics.jsonl, the run's record: one JSON object a line, written whole or not at all, and read by one rule.

The rule every reader follows: a line counts once it ends with a newline. The only line that can
lack one is the last, while a writer is in the middle of it or when a run was killed mid-write
(before lines were written whole); it is left out, and `repair` cuts it off before a resumed run
appends. A whole line that is not JSON is damage, not a race: it is an error that names the line.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from .errors import DiskError, MetricsError

FILE_NAME = "metrics.jsonl"


def path_of(run_dir: Path) -> Path:
    return Path(run_dir) / FILE_NAME


def append(path: Path, record: dict[str, Any]) -> None:
    """Append one record, stamped with the wall time, and push it to disk, whole or not at all.

    The line goes out in one write on an O_APPEND descriptor; if the write fails or is short
    (a full disk), the file is cut back to where it was, so no half line is ever left for the
    next record to be glued onto, and the failure is a one-line DiskError.
    """
    line = (json.dumps({"time": round(time.time(), 3), **record}) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        try:
            written = os.write(fd, line)
            if written != len(line):
                raise OSError(28, "No space left on device (short write)")
            os.fsync(fd)
        except OSError as exc:
            try:
                os.ftruncate(fd, size)
            except OSError:
                pass
            raise DiskError(f"cannot write {path}: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)


def repair(path: Path) -> int:
    """Cut off an unterminated last line; returns the bytes dropped (0 when the file is whole or absent)."""
    if not path.is_file():
        return 0
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return 0
    keep = data.rfind(b"\n") + 1
    with open(path, "r+b") as fh:
        fh.truncate(keep)
    return len(data) - keep


def read(path: Path) -> list[dict[str, Any]]:
    """Every whole record, in the order written; an unterminated last line is not yet (or never will be) a record."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    records = []
    for number, line in enumerate(data.split(b"\n")[:-1], 1):  # the piece after the last newline is unterminated
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:  # bad JSON, or bytes that are not UTF-8 text
            reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "not UTF-8 text"
            raise MetricsError(f"{path}, line {number}: not a JSON record ({reason})") from None
        if not isinstance(record, dict):
            raise MetricsError(f"{path}, line {number}: not a JSON object")
        records.append(record)
    return records


def events(records: list[dict[str, Any]], event: str) -> list[dict[str, Any]]:
    """The records of one kind (start, resume, step, epoch, stopped, end, data_check), in order."""
    return [r for r in records if r.get("event") == event]


def latest_per(records: list[dict[str, Any]], event: str, key: str) -> list[dict[str, Any]]:
    """The last record of `event` for each value of `key`, sorted by it.

    A killed run can have logged an epoch (or steps) whose checkpoint never landed; the resume
    trains it again, and the later record is the one that counts.
    """
    last = {r[key]: r for r in events(records, event)}
    return [last[k] for k in sorted(last)]
