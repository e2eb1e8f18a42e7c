"""Read back what an offline W&B run wrote (run-<id>.wandb), since wandb 0.31 ships no public reader.

The file is a LevelDB-style log: a 7-byte header (b":W&B", 0xBEE1 little-endian, version 0),
then 32 KiB blocks of records, each with a 7-byte header (crc32 seeded with the type byte,
length as uint16 little-endian, type FULL=1/FIRST=2/MIDDLE=3/LAST=4) and a payload that is
one chunk of a serialised `wandb_internal_pb2.Record`.

Images logged as values are files of the run folder (`files/media/images/...`, named by the history
row); a logged `wandb.Table` is an artifact of type `run_table`, whose files (the table's JSON and
its images) an offline run keeps in W&B's staging folder (under $HOME, or WANDB_DATA_DIR) until
`wandb sync`: its `artifact` record names each file's `local_path` there.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def payloads(path: str | Path) -> Iterator[bytes]:
    """Every whole record payload in the file, in order; checks each chunk's crc."""
    data = Path(path).read_bytes()
    if data[: len(HEADER)] != HEADER:
        raise ValueError(f"{path}: not a W&B log (header {data[:7]!r})")
    pos, pending = len(HEADER), b""
    while pos + 7 <= len(data):
        room = BLOCK - pos % BLOCK
        if room < 7:  # a block tail too short for a header is zero padding
            pos += room
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        if kind == 0 and length == 0:  # zero padding up to the block end
            pos += room
            continue
        if len(chunk) < length:
            break  # a record cut short by a kill
        if zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != crc:
            raise ValueError(f"{path}: bad checksum at byte {pos}")
        pos += 7 + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk
            pending = b""
        else:
            raise ValueError(f"{path}: unknown record type {kind} at byte {pos}")


def read_run(path: str | Path) -> dict[str, Any]:
    """The W&B run id, config, history rows, summary and artifacts as plain Python values (JSON-decoded).

    Each artifact: its name, type, aliases, metadata, {path in the artifact: local file} and, per path, the manifest
    entry (`digest`: W&B's base64 MD5 of the file; `ref`: a reference's URI, empty for a file W&B uploads from
    `local_path`, its staged copy)."""
    from wandb.proto import wandb_internal_pb2 as pb

    run_id, job_type = "", ""
    config: dict[str, Any] = {}
    history: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    artifacts: list[dict[str, Any]] = []

    def key(item) -> str:
        return item.key or "/".join(item.nested_key)

    for raw in payloads(path):
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id, job_type = record.run.run_id, record.run.job_type
        if kind == "config" or (kind == "run" and record.run.HasField("config")):
            items = record.config.update if kind == "config" else record.run.config.update
            for item in items:
                config[key(item)] = json.loads(item.value_json)
        elif kind == "history":
            history.append({key(item): json.loads(item.value_json) for item in record.history.item})
        elif kind == "summary":
            for item in record.summary.update:
                summary[key(item)] = json.loads(item.value_json)
        elif kind == "artifact":
            a = record.artifact
            files = {entry.path: entry.local_path for entry in a.manifest.contents}
            entries = {
                e.path: {"digest": e.digest, "size": e.size, "ref": e.ref, "local_path": e.local_path}
                for e in a.manifest.contents
            }
            artifacts.append(
                {
                    "name": a.name,
                    "type": a.type,
                    "aliases": list(a.aliases),
                    "metadata": json.loads(a.metadata) if a.metadata else {},
                    "files": files,
                    "entries": entries,
                }
            )
    return {
        "path": str(path),
        "run_id": run_id,
        "job_type": job_type,
        "config": config,
        "history": history,
        "summary": summary,
        "artifacts": artifacts,
    }


def _row_with(logged: dict[str, Any], field: str) -> dict[str, Any]:
    rows = [row for row in logged["history"] if field in row]
    if not rows:
        raise KeyError(f"no history row has {field}")
    return rows[-1]


def image(logged: dict[str, Any], key: str) -> bytes:
    """The file of an image logged under `key` (the last one), from the run folder's media."""
    row = _row_with(logged, f"{key}/path")
    assert row[f"{key}/_type"] == "image-file", row
    return (Path(logged["path"]).parent / "files" / row[f"{key}/path"]).read_bytes()


def table(logged: dict[str, Any], key: str) -> dict[str, Any]:
    """The table logged under `key` (the last one): its columns, and its rows with each image cell's file bytes
    under `bytes` (read from the run_table artifact's staged files)."""
    row = _row_with(logged, f"{key}/_type")
    assert row[f"{key}/_type"] == "table-file", row
    name = f"{key}.table.json"
    found = [a for a in logged["artifacts"] if a["type"] == "run_table" and name in a["files"]]
    if not found:
        raise KeyError(f"no run_table artifact holds {name}")
    files = found[-1]["files"]
    data = json.loads(Path(files[name]).read_text())

    def cell(value):
        if isinstance(value, dict) and value.get("_type") == "image-file":
            return {**value, "bytes": Path(files[value["path"]]).read_bytes()}
        return value

    return {"columns": data["columns"], "rows": [[cell(v) for v in r] for r in data["data"]]}
