"""Read a packed data set (`flowers-dist data pack`): detect it, load and verify its manifest, list and read samples.

A packed folder holds, per split, WebDataset tar shards (`<split>/shard-000000.tar`, ...), each
with its index (`<split>/shard-000000.idx`, the `wds2idx` format that DALI's
`fn.readers.webdataset` takes as `index_paths`), a listing `<split>/samples.tsv` (key, label,
shard, source file) and `manifest.json`, written last: a folder without it is no pack.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..errors import DataError
from .folder import Split

MANIFEST = "manifest.json"
FORMAT = "flowers-dist-shards"
VERSION = 1
INDEX_VERSION = "v1.2"  # the first word of a wds2idx index file (DALI's tools/wds2idx.py)
LISTING = "samples.tsv"
LABEL_EXT = "cls"


@dataclass(frozen=True)
class Shard:
    """One tar shard and its index, as the manifest describes them (paths absolute)."""

    tar: Path
    index: Path
    samples: int
    bytes: int
    sha256: str
    index_bytes: int
    index_sha256: str
    class_counts: dict[str, int]


@dataclass(frozen=True)
class PackedSplit:
    name: str
    shards: tuple[Shard, ...]
    samples: int
    class_counts: dict[str, int]
    listing: Path


@dataclass(frozen=True)
class Packed:
    """A packed data set whose manifest was read and whose files were found as it says."""

    root: Path
    classes: tuple[str, ...]
    splits: dict[str, PackedSplit]
    manifest: dict


@dataclass(frozen=True)
class Sample:
    """Where one sample's image lies: `size` bytes at `offset` of `shard` (its label is in the listing)."""

    key: str
    label: int
    shard: Path
    offset: int
    size: int
    ext: str
    source: str = ""
    """The file it was packed from, relative to the packed data set's root (`train/daisy/x.jpg`)."""


def is_packed(root: str | Path) -> bool:
    """A folder `data pack` finished writing (it writes the manifest last)."""
    return (Path(root) / MANIFEST).is_file()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(root: Path) -> dict:
    """The manifest as written, or a one-line DataError (missing, not JSON, another format or version)."""
    path = root / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{root} is not a packed data set: no {MANIFEST} (an unfinished `data pack`?)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path} is unreadable or not JSON ({exc}); pack again with `flowers-dist data pack`") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{path} is not a flowers-dist pack manifest (format {FORMAT!r} expected)")
    if manifest.get("version") != VERSION:
        raise DataError(
            f"{path} has pack version {manifest.get('version')}, this flowers-dist reads version {VERSION}; pack again"
        )
    return manifest


def _check_file(root: Path, rel: str, size: int, sha256: str, verify: bool) -> Path:
    path = root / rel
    try:
        actual = path.stat().st_size
    except OSError:
        raise DataError(f"packed data {root}: {rel} is missing (pack again with `flowers-dist data pack`)") from None
    if actual != size:
        raise DataError(
            f"packed data {root}: {rel} is {actual} bytes, the manifest says {size} (truncated or replaced)"
        )
    if verify and sha256_file(path) != sha256:
        raise DataError(f"packed data {root}: {rel} fails its SHA-256 check against the manifest (corrupted)")
    return path


def load(root: str | Path, verify: bool = False) -> Packed:
    """Read the manifest and check that every shard, index and listing is there at its size.

    verify=True also checks every file's SHA-256, which reads every byte (the slow part)."""
    root = Path(root)
    manifest = read_manifest(root)
    try:
        splits = {}
        for name, s in manifest["splits"].items():
            shards = tuple(
                Shard(
                    _check_file(root, sh["file"], sh["bytes"], sh["sha256"], verify),
                    _check_file(root, sh["index"], sh["index_bytes"], sh["index_sha256"], verify),
                    sh["samples"],
                    sh["bytes"],
                    sh["sha256"],
                    sh["index_bytes"],
                    sh["index_sha256"],
                    dict(sh["class_counts"]),
                )
                for sh in s["shards"]
            )
            listing = _check_file(root, s["listing"], s["listing_bytes"], s["listing_sha256"], verify)
            splits[name] = PackedSplit(name, shards, s["samples"], dict(s["class_counts"]), listing)
        classes = tuple(manifest["classes"])
    except (KeyError, TypeError) as exc:
        raise DataError(f"{root / MANIFEST} lacks a field ({exc}); pack again with `flowers-dist data pack`") from None
    return Packed(root, classes, splits, manifest)


def read_index(path: Path) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """A wds2idx index: per sample, its key and {extension: (data offset, size)}, in tar order."""
    try:
        lines = path.read_text().splitlines()
        version, count = lines[0].split()
        if version != INDEX_VERSION or int(count) != len(lines) - 1:
            raise ValueError(f"header {lines[0]!r}, {len(lines) - 1} sample lines")
        out = []
        for line in lines[1:]:
            words = line.split()
            if not words or len(words) % 4:
                raise ValueError(f"line {line!r}")
            parts, key = {}, None
            for i in range(0, len(words), 4):
                ext, offset, size, name = words[i : i + 4]
                key = name[: -len(ext) - 1]
                parts[ext] = (int(offset), int(size))
            out.append((key, parts))
        return out
    except (OSError, ValueError, IndexError) as exc:
        raise DataError(f"index {path} is unreadable or not a wds2idx v1.2 index ({exc})") from None


def samples(packed: Packed, split: str) -> list[Sample]:
    """Every sample of a split in pack order: offsets and sizes from the index files, labels from the listing."""
    part = packed.splits[split]
    with open(part.listing, newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))[1:]
    labels = {key: int(label) for key, label, _, _ in rows}
    sources = {key: source for key, _, _, source in rows}
    out: list[Sample] = []
    for shard in part.shards:
        entries = read_index(shard.index)
        if len(entries) != shard.samples:
            raise DataError(f"index {shard.index} lists {len(entries)} samples, the manifest says {shard.samples}")
        for key, parts in entries:
            image = [(e, v) for e, v in parts.items() if e != LABEL_EXT]
            if len(image) != 1 or key not in labels:
                raise DataError(f"index {shard.index}: sample {key} is not one image with a label in {part.listing}")
            (ext, (offset, size)) = image[0]
            out.append(Sample(key, labels[key], shard.tar, offset, size, ext, sources[key]))
    if len(out) != part.samples:
        raise DataError(f"packed split {split}: the indexes list {len(out)} samples, the manifest says {part.samples}")
    return out


def read_sample(sample: Sample) -> bytes:
    """One sample's image bytes, exactly as they were in the source file."""
    with open(sample.shard, "rb") as f:
        f.seek(sample.offset)
        data = f.read(sample.size)
    if len(data) != sample.size:
        raise DataError(f"shard {sample.shard} ends inside sample {sample.key} (truncated)")
    return data


def split(packed: Packed, name: str) -> Split:
    """A packed split as the loaders take it: its samples in the order a scan of the source folder lists them.

    Class, then source path: the order of `folder.scan_split` over the files that were packed, so
    `contract.train_shard` deals the same samples into the same global batches as from the folder.
    The pack's own order (classes interleaved) is what DALI's sequential reader follows instead.
    `files` holds names (`<split>/<key>.<ext>` under the root) for messages, not files on disk.
    """
    members = tuple(sorted(samples(packed, name), key=lambda s: (s.label, s.source)))
    files = tuple(packed.root / name / f"{s.key}.{s.ext}" for s in members)
    return Split(packed.root / name, packed.classes, files, tuple(s.label for s in members), members=members)


class SampleReader:
    """Reads samples by offset, keeping each shard open: one per process (each DataLoader worker has its own copy)."""

    def __init__(self) -> None:
        self.handles: dict[Path, BinaryIO] = {}

    def read(self, sample: Sample) -> bytes:
        f = self.handles.get(sample.shard)
        if f is None:
            f = self.handles[sample.shard] = open(sample.shard, "rb")  # noqa: SIM115 (kept open on purpose)
        f.seek(sample.offset)
        data = f.read(sample.size)
        if len(data) != sample.size:
            raise DataError(f"shard {sample.shard} ends inside sample {sample.key} (truncated)")
        return data

    def __getstate__(self) -> dict:
        return {"handles": {}}  # a worker opens its own: file offsets must not be shared between processes

    def close(self) -> None:
        for f in self.handles.values():
            f.close()
        self.handles.clear()
