"""Read back what an offline W&B run wrote (run-<id>.wandb), since wandb 0.31 ships no public reader.

The file is a LevelDB-style log: a 7-byte header (b":W&B", 0xBEE1 little-endian, version 0),
then 32 KiB blocks of records, each with a 7-byte header (crc32 seeded with the type byte,
length as uint16 little-endian, type FULL=1/FIRST=2/MIDDLE=3/LAST=4) and a payload that is
one chunk of a serialised `wandb_internal_pb2.Record`.
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
    """The W&B run id, config, history rows and summary as plain Python values (JSON-decoded)."""
    from wandb.proto import wandb_internal_pb2 as pb

    run_id = ""
    config: dict[str, Any] = {}
    history: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}

    def key(item) -> str:
        return item.key or "/".join(item.nested_key)

    for raw in payloads(path):
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id = record.run.run_id
        if kind == "config" or (kind == "run" and record.run.HasField("config")):
            items = record.config.update if kind == "config" else record.run.config.update
            for item in items:
                config[key(item)] = json.loads(item.value_json)
        elif kind == "history":
            history.append({key(item): json.loads(item.value_json) for item in record.history.item})
        elif kind == "summary":
            for item in record.summary.update:
                summary[key(item)] = json.loads(item.value_json)
    return {"run_id": run_id, "config": config, "history": history, "summary": summary}
