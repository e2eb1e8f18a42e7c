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
import multiprocessing
import sys
import tarfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..config import DataConfig
from ..errors import DataError
from . import shards
from .probe import probe_bytes

CHUNK = 32  # samples per pool task, as the data check's files


@dataclass(frozen=True)
class Located:
    """One sample to decode: its name (`<split>/<shard>:<key>`) and where its image lies."""

    name: str
    tar: Path
    offset: int
    size: int


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


def _check_split(root: Path, name: str, s: dict, classes: tuple[str, ...], report: PackReport) -> list[Located]:
    """The split's files into the report; the samples whose index fits its tar, to decode."""
    located: list[Located] = []
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
            (offset, size) = next(v for ext, v in parts.items() if ext != shards.LABEL_EXT)
            located.append(Located(f"{sh['file']}:{key}", shard.tar, offset, size))
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
        for c in sorted({c for c, n in manifest.items() if n} | set(listed_here)):
            if manifest.get(c, 0) != listed_here[c]:
                by = f"{manifest.get(c, 0)} by {shards.MANIFEST}, {listed_here[c]} by the listing"
                return f"{sh['file']} holds {c!r} sample(s): {by}"
    return None


def _decode_chunk(args: tuple[list[Located], int, int]) -> list[str]:
    """The samples of a chunk that do not decode, each as `<name>: <kind>: <detail>` (for a process pool)."""
    chunk, max_pixels, min_side = args
    out = []
    reader = shards.SampleReader()
    try:
        for sample in chunk:
            try:
                data = reader.read(shards.Sample(sample.name, 0, sample.tar, sample.offset, sample.size, ""))
            except (OSError, DataError) as exc:
                out.append(f"{sample.name}: unreadable: {exc}")
                continue
            verdict = probe_bytes(sample.name, data, max_pixels, min_side)
            if verdict.skipped:
                out.append(f"{sample.name}: {verdict.kind}: {verdict.detail}")
    finally:
        reader.close()
    return out


def _decode_all(located: list[Located], cfg: DataConfig, workers: int, progress: bool) -> list[str]:
    from tqdm import tqdm

    chunks = [(located[i : i + CHUNK], cfg.max_pixels, cfg.min_side) for i in range(0, len(located), CHUNK)]
    found: dict[int, list[str]] = {}
    with tqdm(total=len(located), unit="img", desc="decode", file=sys.stderr, disable=not progress, leave=False) as bar:
        if workers <= 1 or len(chunks) <= 1:
            for i, chunk in enumerate(chunks):
                found[i] = _decode_chunk(chunk)
                bar.update(len(chunk[0]))
        else:
            # fork, as the data check: the children run PIL only, and spawn would re-run the caller's main script.
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
                futures = {pool.submit(_decode_chunk, chunk): i for i, chunk in enumerate(chunks)}
                for future in as_completed(futures):
                    found[futures[future]] = future.result()
                    bar.update(len(chunks[futures[future]][0]))
    return [line for i in range(len(chunks)) for line in found[i]]


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
        report.undecodable = _decode_all(located, cfg, workers, progress)
    report.seconds = time.perf_counter() - start
    return report
