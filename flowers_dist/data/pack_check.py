"""`flowers-dist data check PACK`: every byte of a packed data set against its manifest, and with --decode every sample.

A run checks at start only what does not grow with the shards' bytes (shards.load). This reads them
all: each shard's, index's and listing's size and SHA-256; each index against every header of its
tar; the listing's keys and counts per shard and class against the indexes and the manifest; and
with --decode each sample decoded by PIL as the data check probes a file (probe.probe_bytes), in
worker processes. One line per bad file, one per sample that does not decode, exit 2 if any.
"""

from __future__ import annotations

import csv
import io
import tarfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..config import DataConfig
from ..errors import DataError
from . import shards
from .check import run_chunked
from .probe import probe_bytes


@dataclass
class PackReport:
    root: Path
    shards: int = 0
    samples: int = 0
    bad: list[str] = field(default_factory=list)
    """One line per bad file (shard, index, listing) or disagreement with the manifest."""
    undecodable: list[str] = field(default_factory=list)
    """One line per sample that does not decode: `<split>/<shard>:<key>: <kind>: <detail>`."""
    decoded: bool = False
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        return 2 if self.bad or self.undecodable else 0

    def format(self) -> str:
        what = "sizes, SHA-256s, indexes against the tars, counts" + (", every sample decoded" if self.decoded else "")
        lines = [
            f"data check of packed {self.root}: {self.shards} shard(s), {self.samples} samples ({what}), "
            f"{self.seconds:.1f} s"
        ]
        if self.bad:
            lines += [f"bad files ({len(self.bad)}):", *(f"  {line}" for line in self.bad)]
        if self.undecodable:
            lines += [f"samples that do not decode ({len(self.undecodable)}):", *(f"  {u}" for u in self.undecodable)]
        if not self.decoded and not self.undecodable:
            lines.append("samples not decoded: add --decode to decode every one")
        verdict = "clean" if not self.exit_code else "training would stop or skip: pack again with `data pack`"
        lines.append(f"exit {self.exit_code}: {verdict}")
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict:
        return {**asdict(self), "root": str(self.root), "exit_code": self.exit_code}


def _file_problem(root: Path, rel: str, size: int, sha256: str) -> str | None:
    path = root / rel
    if not path.is_file():
        return "missing"
    if (actual := path.stat().st_size) != size:
        return f"{actual} bytes, the manifest says {size} (truncated or replaced)"
    if shards.sha256_file(path) != sha256:
        return "fails its SHA-256 check against the manifest (corrupted)"
    return None


def _index_problem(shard: shards.Shard) -> tuple[str | None, list]:
    """Whether the index lists exactly the tar's members (every header, in order); and its entries."""
    try:
        entries = shards.read_index(shard.index)
        with tarfile.open(shard.tar) as tar:
            members = [(m.name, m.offset_data, m.size) for m in tar.getmembers()]
    except DataError as exc:
        return str(exc), []
    except (tarfile.TarError, OSError) as exc:
        return f"not a whole tar ({exc})", []
    listed = [(f"{key}.{ext}", offset, size) for key, parts in entries for ext, (offset, size) in parts.items()]
    if listed != members:
        i = next((i for i, (a, b) in enumerate(zip(listed, members)) if a != b), min(len(listed), len(members)))
        index_says, tar_says = (
            "nothing" if i >= len(side) else f"{side[i][0]} ({side[i][2]} bytes at {side[i][1]})"
            for side in (listed, members)
        )
        return f"the index does not fit the tar: member {i} is {index_says} by the index, {tar_says} in the tar", []
    return None, entries


def _check_split(root: Path, name: str, s: dict, classes: tuple[str, ...], report: PackReport) -> list[shards.Sample]:
    """The split's files into the report; the samples whose index fits its tar, to decode (each keyed by its name,
    `<split>/<shard>:<key>`)."""
    located: list[shards.Sample] = []
    keys: dict[str, list[str]] = {}
    for sh in s["shards"]:
        shard = shards.described(root, sh)
        report.shards += 1
        report.samples += sh["samples"]
        tar_problem = _file_problem(root, sh["file"], sh["bytes"], sh["sha256"])
        index_problem = _file_problem(root, sh["index"], sh["index_bytes"], sh["index_sha256"])
        fit, entries = _index_problem(shard) if shard.tar.is_file() and shard.index.is_file() else (None, [])
        if entries and len(entries) != sh["samples"]:
            count = f"lists {len(entries)} samples, {shards.MANIFEST} says {sh['samples']}"
            index_problem = f"{index_problem}; {count}" if index_problem else count
        # One line a file: a shard's own fault and whether its index fits it; the index's own fault.
        for rel, *why in ((sh["file"], tar_problem, fit), (sh["index"], index_problem)):
            if any(why):
                report.bad.append(f"{rel}: {'; '.join(w for w in why if w)}")
        keys[sh["file"]] = [key for key, _ in entries]
        for key, parts in entries:
            ext, (offset, size) = next((e, v) for e, v in parts.items() if e != shards.LABEL_EXT)
            located.append(shards.Sample(f"{sh['file']}:{key}", 0, shard.tar, offset, size, ext))
    if (why := _file_problem(root, s["listing"], s["listing_bytes"], s["listing_sha256"])) is not None:
        report.bad.append(f"{s['listing']}: {why}")
    elif (why := _listing_problem(root, name, s, classes, keys)) is not None:
        report.bad.append(f"{s['listing']}: {why}")
    return located


def _listing_problem(
    root: Path, split: str, s: dict, classes: tuple[str, ...], keys: dict[str, list[str]]
) -> str | None:
    """The listing against the indexes (the same keys in each shard) and the manifest (counts per shard and class)."""
    listing = (root / s["listing"]).read_bytes()
    if (why := shards.counts_mismatch(split, s, classes, listing)) is not None:
        return f"disagrees with {shards.MANIFEST}: {why}"
    rows = list(csv.reader(io.StringIO(listing.decode(errors="replace")), delimiter="\t"))[1:]
    if any(len(row) != 4 for row in rows):
        return "has a row without its four fields (key, label, shard, source)"
    listed: dict[str, list[str]] = {}
    for key, _, shard, *_ in rows:
        listed.setdefault(shard, []).append(key)
    for shard, found in keys.items():
        if found and sorted(listed.get(shard, [])) != sorted(found):
            return f"lists other samples in {shard} than its index"
    per_shard: dict[str, Counter[str]] = {}
    for _, label, shard, _ in rows:
        per_shard.setdefault(shard, Counter())[classes[int(label)]] += 1
    for sh in s["shards"]:
        manifest, listed_here = sh["class_counts"], per_shard.get(sh["file"], Counter())
        if (c := shards.first_difference(manifest, listed_here)) is not None:
            by = f"{manifest.get(c, 0)} by {shards.MANIFEST}, {listed_here[c]} by the listing"
            return f"{sh['file']} holds {c!r} sample(s): {by}"
    return None


def _decode_chunk(args: tuple[list[shards.Sample], int, int]) -> list[str]:
    """The samples of a chunk that do not decode, each as `<name>: <kind>: <detail>` (for a process pool)."""
    chunk, max_pixels, min_side = args
    out = []
    reader = shards.SampleReader()
    try:
        for sample in chunk:
            try:
                data = reader.read(sample)
            except (OSError, DataError) as exc:
                out.append(f"{sample.key}: unreadable: {exc}")
                continue
            verdict = probe_bytes(sample.key, data, max_pixels, min_side)
            if verdict.skipped:
                out.append(f"{sample.key}: {verdict.kind}: {verdict.detail}")
    finally:
        reader.close()
    return out


def check_pack(
    root: str | Path, cfg: DataConfig, *, decode: bool = False, workers: int = 1, progress: bool = False
) -> PackReport:
    """Every file of the pack at ROOT against its manifest; with decode, every sample through PIL."""
    start = time.perf_counter()
    root = Path(root)
    manifest = shards.read_manifest(root)
    report = PackReport(root, decoded=decode)
    try:
        classes = tuple(manifest["classes"])
        located = [
            loc for name, s in manifest["splits"].items() for loc in _check_split(root, name, s, classes, report)
        ]
    except (KeyError, TypeError) as exc:
        raise DataError(
            f"{root / shards.MANIFEST} lacks a field ({exc}); pack again with `flowers-dist data pack`"
        ) from None
    if decode:
        report.undecodable = run_chunked(_decode_chunk, located, cfg, workers, progress, desc="decode", unit="img")
    report.seconds = time.perf_counter() - start
    return report
