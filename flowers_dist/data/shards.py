"""Read a packed data set (`flowers-dist data pack`): detect it, load and verify its manifest, list and read samples.

A packed folder holds, per split, WebDataset tar shards (`<split>/shard-000000.tar`, ...), each
with its index (`<split>/shard-000000.idx`, the `wds2idx` format that DALI's
`fn.readers.webdataset` takes as `index_paths`), a listing `<split>/samples.tsv` (key, label,
shard, source file) and `manifest.json`, written last: a folder without it is no pack.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
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
TAR_BLOCK = 512  # a tar header; a member's data starts right after its header


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
    index_data: tuple[bytes, ...] = field(repr=False, compare=False)
    """Each shard's index as load() read and checked it: samples() parses these rather than reading them again."""
    listing_data: bytes = field(repr=False, compare=False)
    """The listing as load() read and checked it."""


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


def _check_file(
    root: Path, rel: str, size: int, sha256: str, verify: bool, replaced: str = "truncated or replaced"
) -> Path:
    path = root / rel
    try:
        actual = path.stat().st_size
    except OSError:
        raise DataError(f"packed data {root}: {rel} is missing (pack again with `flowers-dist data pack`)") from None
    if actual != size:
        raise DataError(f"packed data {root}: {rel} is {actual} bytes, the manifest says {size} ({replaced})")
    if verify and sha256_file(path) != sha256:
        raise DataError(f"packed data {root}: {rel} fails its SHA-256 check against the manifest (corrupted)")
    return path


def _read_verified(root: Path, rel: str, size: int, sha256: str, why: str) -> bytes:
    """A small file of the pack (an index, a listing), read whole and checked against the manifest's size and hash."""
    data = _check_file(root, rel, size, sha256, False, why).read_bytes()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise DataError(f"packed data {root}: {rel} fails its SHA-256 check against the manifest ({why})")
    return data


def load(root: str | Path, verify: bool = False) -> Packed:
    """Read the manifest and check the pack against it; a fault is a one-line DataError naming the file.

    Every start pays what does not grow with the shards' bytes: every shard there at its size, every
    index and listing at its SHA-256 (about 130 bytes a sample), each index agreeing with its tar
    (`check_index`: three 512-byte reads a shard), and the listing's counts per class agreeing with
    the manifest's (about 1 s in all for ImageNet's 1.28 M samples, docs/data.md). verify=True also
    checks every shard's SHA-256, which reads every byte; `flowers-dist data check PACK` does that too."""
    root = Path(root)
    manifest = read_manifest(root)
    try:
        classes = tuple(manifest["classes"])
        splits = {name: _load_split(root, name, s, classes, verify) for name, s in manifest["splits"].items()}
    except (KeyError, TypeError) as exc:
        raise DataError(f"{root / MANIFEST} lacks a field ({exc}); pack again with `flowers-dist data pack`") from None
    return Packed(root, classes, splits, manifest)


def described(root: Path, sh: dict) -> Shard:
    """A shard as its entry in the manifest describes it."""
    return Shard(
        root / sh["file"],
        root / sh["index"],
        sh["samples"],
        sh["bytes"],
        sh["sha256"],
        sh["index_bytes"],
        sh["index_sha256"],
        dict(sh["class_counts"]),
    )


def _load_split(root: Path, name: str, s: dict, classes: tuple[str, ...], verify: bool) -> PackedSplit:
    shards, indexes = [], []
    for sh in s["shards"]:
        _check_file(root, sh["file"], sh["bytes"], sh["sha256"], verify)
        stale = f"the index of {sh['file']}: stale, written for another shard or pack?"
        index = _read_verified(root, sh["index"], sh["index_bytes"], sh["index_sha256"], stale)
        shard = described(root, sh)
        check_index(root, shard, index)
        shards.append(shard)
        indexes.append(index)
    listing = _read_verified(root, s["listing"], s["listing_bytes"], s["listing_sha256"], "corrupted or replaced")
    check_counts(root, name, s, classes, listing)
    listed = root / s["listing"]
    return PackedSplit(name, tuple(shards), s["samples"], dict(s["class_counts"]), listed, tuple(indexes), listing)


def _parse_entry(line: str) -> tuple[str, dict[str, tuple[int, int]]]:
    """One sample line of a wds2idx index: its key and {extension: (data offset, size)}."""
    words = line.split()
    if not words or len(words) % 4:
        raise ValueError(f"line {line!r}")
    parts, key = {}, ""
    for i in range(0, len(words), 4):
        ext, offset, size, name = words[i : i + 4]
        key = name[: -len(ext) - 1]
        parts[ext] = (int(offset), int(size))
    return key, parts


def _member_at(tar: BinaryIO, offset: int) -> tuple[str, int]:
    """The name and size in the tar header just before the data at offset ("" and -1 where none can be read)."""
    if offset < TAR_BLOCK:
        return "", -1
    tar.seek(offset - TAR_BLOCK)
    block = tar.read(TAR_BLOCK)
    if len(block) < TAR_BLOCK:
        return "", -1
    name = block[:100].split(b"\0", 1)[0].decode(errors="replace")
    try:
        size = int(block[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        size = -1
    return name, size


def index_mismatch(shard: Shard, index: bytes) -> str | None:
    """Why the index was not written for this tar, from its count and its first and last samples (None: it fits)."""
    text = index.decode(errors="replace")
    header, _, rest = text.partition("\n")
    words = header.split()
    if len(words) != 2 or words[0] != INDEX_VERSION or not words[1].isdigit():
        return f"its header is {header[:40]!r}, not a wds2idx {INDEX_VERSION} index's"
    if int(words[1]) != shard.samples:
        return f"it lists {words[1]} samples, the manifest {shard.samples}"
    if text.count("\n") != shard.samples + 1:
        return f"its header says {shard.samples} samples, it has {text.count(chr(10)) - 1} lines"
    try:
        ends = [_parse_entry(rest.partition("\n")[0]), _parse_entry(rest.rstrip("\n").rpartition("\n")[2])]
    except ValueError as exc:
        return f"it is not a wds2idx index ({exc})"
    with open(shard.tar, "rb") as tar:
        for key, parts in ends:
            for ext, (offset, size) in parts.items():
                if offset + size > shard.bytes:
                    return f"sample {key}'s .{ext} would end at byte {offset + size}, past the tar's {shard.bytes}"
                found = _member_at(tar, offset)
                if found != (f"{key}.{ext}", size):
                    held = repr(found[0]) if found[0] else "no member"
                    return f"the tar holds {held} at byte {offset}, not {key}.{ext} ({size} bytes)"
    return None


def check_index(root: Path, shard: Shard, index: bytes) -> None:
    """The index (its bytes) was written for this tar: its count is the manifest's, and the tar headers before the
    first and last samples' data name those members at those sizes, inside the tar. A constant few reads a shard."""
    why = index_mismatch(shard, index)
    if why is not None:
        idx, tar = (p.relative_to(root).as_posix() for p in (shard.index, shard.tar))
        raise DataError(
            f"packed data {root}: index {idx} does not fit {tar}: {why} "
            "(a stale index, a replaced shard or an edited manifest; pack again with `flowers-dist data pack`)"
        )


def first_difference(manifest: dict[str, int], listing: Counter[str]) -> str | None:
    """The first key (in sorted order) whose count differs, leaving out zero counts; None if they agree."""
    keys = sorted({k for k, n in manifest.items() if n} | {k for k, n in listing.items() if n})
    return next((k for k in keys if manifest.get(k, 0) != listing.get(k, 0)), None)


LISTED_LABEL = re.compile(rb"\n[^\t\n]*\t([^\t\n]*)")  # the label column of every row after the header


def counts_mismatch(split: str, s: dict, classes: tuple[str, ...], listing: bytes) -> str | None:
    """Where the manifest's counts of a split, per class and in all, differ from its listing's (None: they agree).

    A regular expression over the bytes, not the csv module: about 0.5 s for ImageNet's 1.28 M rows."""
    try:
        per_class = Counter({classes[int(label)]: n for label, n in Counter(LISTED_LABEL.findall(listing)).items()})
    except (ValueError, IndexError):
        return "the listing has a row whose label is no class index"
    if (c := first_difference(s["class_counts"], per_class)) is not None:
        by = f"{s['class_counts'].get(c, 0)} by the manifest, {per_class[c]} by the listing"
        return f"{split} holds {c!r} sample(s): {by}"
    if s["samples"] != per_class.total():
        return f"{split} holds {s['samples']} sample(s) by the manifest, {per_class.total()} by the listing"
    return None


def check_counts(root: Path, split: str, s: dict, classes: tuple[str, ...], listing: bytes) -> None:
    """The manifest's counts of a split (`s`, its entry in the manifest) are its listing's, per class and in all."""
    why = counts_mismatch(split, s, classes, listing)
    if why is not None:
        raise DataError(
            f"packed data {root}: {MANIFEST} disagrees with {s['listing']}: {why}; "
            "pack again with `flowers-dist data pack`"
        )


def read_index(path: Path) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """A wds2idx index file: per sample, its key and {extension: (data offset, size)}, in tar order."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"index {path} is unreadable or not a wds2idx v1.2 index ({exc})") from None
    return parse_index(data, path)


def parse_index(data: bytes, path: Path) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """The entries of an index's bytes (read_index); `path` names it in the error."""
    try:
        lines = data.decode().splitlines()
        version, count = lines[0].split()
        if version != INDEX_VERSION or int(count) != len(lines) - 1:
            raise ValueError(f"header {lines[0]!r}, {len(lines) - 1} sample lines")
        return [_parse_entry(line) for line in lines[1:]]
    except (UnicodeDecodeError, ValueError, IndexError) as exc:
        raise DataError(f"index {path} is unreadable or not a wds2idx v1.2 index ({exc})") from None


def samples(packed: Packed, split: str) -> list[Sample]:
    """Every sample of a split in pack order: offsets and sizes from the index files, labels from the listing."""
    part = packed.splits[split]
    rows = list(csv.reader(io.StringIO(part.listing_data.decode(), newline=""), delimiter="\t"))[1:]
    labels = {key: int(label) for key, label, _, _ in rows}
    sources = {key: source for key, _, _, source in rows}
    out: list[Sample] = []
    for shard, index in zip(part.shards, part.index_data, strict=True):
        entries = parse_index(index, shard.index)
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


def looks_whole(head: bytes, tail: bytes) -> bool:
    """Whether an image's first 8 and last 12 bytes are a whole JPEG's (SOI ... EOI) or PNG's (... IEND)."""
    if head.startswith(b"\x89PNG"):
        return b"IEND" in tail
    # Some writers append a few bytes after a JPEG's EOI: it is looked for in the tail, not at its very end.
    return head.startswith(b"\xff\xd8") and b"\xff\xd9" in tail


def suspect_samples(members: Iterable[Sample], limit: int = 3) -> list[str]:
    """Samples whose bytes in their shard do not start and end as a whole JPEG or PNG, as `<split>/<shard>:<key>`.

    The cheap scan after a decoder failed: two small reads a sample by offset, in shard order; it finds
    a damaged header or end, not damage inside the data (`flowers-dist data check PACK --decode` does)."""
    bad: list[str] = []
    handles: dict[Path, BinaryIO] = {}
    try:
        for s in sorted(members, key=lambda m: (m.shard, m.offset)):
            try:
                if s.shard not in handles:
                    handles[s.shard] = open(s.shard, "rb")  # noqa: SIM115 (closed below, with the others)
                f = handles[s.shard]
                f.seek(s.offset)
                head = f.read(8)
                f.seek(s.offset + max(0, s.size - 12))
                tail = f.read(min(12, s.size))
                whole = len(tail) == min(12, s.size) and looks_whole(head, tail)
            except OSError:
                whole = False
            if not whole:
                bad.append(f"{s.shard.parent.name}/{s.shard.name}:{s.key}")
                if len(bad) == limit:
                    break
    finally:
        for f in handles.values():
            f.close()
    return bad


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
