"""`flowers-dist data pack ROOT OUT`: a data set's usable files as WebDataset tar shards, DALI index files and a manifest.

What it writes (the reader is shards.py):
- `OUT/<split>/shard-000000.tar`, ...: GNU-format tars (DALI failed to read Python's default PAX,
  NVIDIA/DALI#3640). Each sample is `KEY.<ext>`, the image's bytes as they are on disk (the
  source's lower-cased extension), then `KEY.cls`, its class index in ASCII. KEY is the sample's
  position in the split, eight digits. Headers carry no time, owner or mode of the source, and
  the order is a function of the seed, so packing the same files twice gives the same bytes.
- `OUT/<split>/shard-000000.idx`: the shard's index in the format DALI's `wds2idx` writes.
- `OUT/<split>/samples.tsv`: key, label, shard and source file of every sample.
- `OUT/manifest.json`, last: classes, per split and per shard counts (per class too), sizes and
  SHA-256s, the source root, the seed, and what the data check left out and why.

Classes are interleaved: DALI's webdataset reader reads shards in order and shuffles only inside
a buffer, so shards written class by class give one-class batches (NVIDIA/DALI#5429).

Every file is written under a temporary name and renamed when whole, the manifest last, so an
interrupted pack leaves no manifest; a rerun then starts clean (it deletes the shards of the
unfinished pack: only files with the names it writes, and only in a folder holding nothing else).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import random
import sys
import tarfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..config import DataConfig
from ..durable import fsync_dir, write_atomically
from ..errors import DataError
from .folder import Split
from .shards import FORMAT, INDEX_VERSION, LABEL_EXT, LISTING, MANIFEST, VERSION, load, read_manifest

SPLITS = ("train", "val")
SHARD_NAME = "shard-{:06d}"
TMP = ".tmp"
BLOCK = 512  # a tar header, and the unit member data is padded to
END = 2 * BLOCK  # the end-of-archive marker


@dataclass(frozen=True)
class Item:
    """One sample to pack: its key in the split, label, source file and the extension it is stored under."""

    key: str
    label: int
    source: Path
    ext: str

    def tar_bytes(self) -> int:
        """What the sample adds to a tar: a header and padded data for the image, and for the label."""
        return 2 * BLOCK + _padded(self.source.stat().st_size) + _padded(len(str(self.label)))


@dataclass
class ShardRecord:
    """A written shard, as the manifest describes it."""

    file: str
    index: str
    samples: int
    bytes: int
    sha256: str
    index_bytes: int
    index_sha256: str
    class_counts: dict[str, int] = field(default_factory=dict)


def _padded(size: int, unit: int = BLOCK) -> int:
    return -(-size // unit) * unit


def _tar_size(members: int) -> int:
    """A tar's file size from its members' bytes: the end marker, then tarfile pads to its record size (10 KiB)."""
    return _padded(members + END, tarfile.RECORDSIZE)


def interleave(labels: Sequence[int], seed: int) -> list[int]:
    """A seeded order of the indices of `labels` in which every class is spread evenly over the whole list.

    A class of n samples gets one sample in each n-th of the list, at a random point inside it,
    and which of its files goes where is shuffled; so any stretch of the list holds each class in
    about its share, where a plain shuffle can leave runs of one class by chance."""
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    placed: list[tuple[float, int, int]] = []
    for label in sorted(by_class):
        members = by_class[label]
        rng.shuffle(members)
        n = len(members)
        placed += [((slot + rng.random()) / n, label, i) for slot, i in enumerate(members)]
    return [i for _, _, i in sorted(placed)]


def plan(split: Split, seed: int) -> list[Item]:
    """The split's samples in the order they are packed; keys are positions in that order."""
    order = interleave(split.labels, seed)
    return [
        Item(f"{n:08d}", split.labels[i], split.files[i], split.files[i].suffix.lower().lstrip("."))
        for n, i in enumerate(order)
    ]


def _fill(sizes: Sequence[int], limit: int) -> list[int]:
    """Where each shard starts when every shard is filled up to limit bytes (a larger sample gets a shard alone)."""
    starts, size = [0], 0
    for i, add in enumerate(sizes):
        if size and _tar_size(size + add) > limit:
            starts.append(i)
            size = 0
        size += add
    return starts


def shard_groups(items: Sequence[Item], shard_bytes: int) -> list[list[Item]]:
    """Consecutive runs of items, each a tar of at most shard_bytes, as few as filling them allows, of even size.

    Filling each shard to the limit leaves a last one of a few samples; the same number of shards cut at
    even shares of the bytes keeps every reader's shards alike (used when no shard then exceeds the limit)."""
    sizes = [item.tar_bytes() for item in items]
    starts = _fill(sizes, shard_bytes)
    total, count, done, even = sum(sizes), len(starts), 0, [0]
    for i, add in enumerate(sizes):
        if i and done >= total * len(even) / count:
            even.append(i)
        done += add
    bounds = [*even, len(items)]
    if len(even) == count and all(
        _tar_size(sum(sizes[a:b])) <= shard_bytes or b - a == 1 for a, b in zip(bounds, bounds[1:])
    ):
        starts = even
    ends = [*starts[1:], len(items)]
    return [list(items[a:b]) for a, b in zip(starts, ends)]


def _member(name: str, size: int) -> tarfile.TarInfo:
    # Fixed metadata: the bytes of a shard depend on the samples alone, not on when or by whom they were packed.
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = size, 0, 0o644, 0, 0, "", ""
    return info


def _write_shard(out: Path, split: str, number: int, items: Sequence[Item], classes: Sequence[str]) -> ShardRecord:
    """One tar and its wds2idx index, each renamed into place only when whole."""
    name = SHARD_NAME.format(number)
    index_lines: list[str] = []

    def write_tar(f) -> None:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.GNU_FORMAT) as tar:
            for item in items:
                parts = []
                for ext, data in ((item.ext, item.source.read_bytes()), (LABEL_EXT, str(item.label).encode())):
                    member = f"{item.key}.{ext}"
                    parts.append(f"{ext} {tar.offset + BLOCK} {len(data)} {member}")
                    tar.addfile(_member(member, len(data)), io.BytesIO(data))
                index_lines.append(" ".join(parts))

    size, digest = write_atomically(out / split / f"{name}.tar", write_tar, TMP)
    index = f"{INDEX_VERSION} {len(items)}\n" + "".join(line + "\n" for line in index_lines)
    index_size, index_digest = write_atomically(out / split / f"{name}.idx", lambda f: f.write(index.encode()), TMP)
    counts = Counter(item.label for item in items)
    return ShardRecord(
        f"{split}/{name}.tar",
        f"{split}/{name}.idx",
        len(items),
        size,
        digest,
        index_size,
        index_digest,
        {classes[c]: counts[c] for c in sorted(counts)},
    )


def _rel(path: Path | str, root: Path) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _fingerprint(root: Path, items: dict[str, list[Item]], skipped: list[dict]) -> str:
    """What was packed from where, by path, size and mtime: an unchanged source packs to the same shards."""
    digest = hashlib.sha256()
    for split, its in items.items():
        for it in its:
            st = it.source.stat()
            digest.update(
                f"{split}\t{it.key}\t{it.label}\t{_rel(it.source, root)}\t{st.st_size}\t{st.st_mtime_ns}\n".encode()
            )
    digest.update(json.dumps(skipped, sort_keys=True).encode())
    return digest.hexdigest()


def _ours(name: str) -> bool:
    base = name[: -len(TMP)] if name.endswith(TMP) else name
    stem, _, ext = base.rpartition(".")
    return base == LISTING or (ext in ("tar", "idx") and stem.startswith("shard-") and stem[len("shard-") :].isdigit())


def _clear(out: Path, dry_run: bool = False) -> None:
    """Delete a previous or unfinished pack in OUT: its manifest first (no moment with a manifest over missing shards),
    then the shards. Refuses, before deleting anything, when OUT holds anything `data pack` does not write."""
    foreign = [p for p in out.iterdir() if p.name not in (*SPLITS, MANIFEST, MANIFEST + TMP)]
    for split in SPLITS:
        if (out / split).is_dir():
            foreign += [p for p in (out / split).iterdir() if not (p.is_file() and _ours(p.name))]
    if foreign:
        raise DataError(
            f"{out} holds files that are not a pack (such as {foreign[0]}); give data pack an empty or new folder"
        )
    if dry_run:
        return
    for name in (MANIFEST, MANIFEST + TMP):
        (out / name).unlink(missing_ok=True)
    for split in SPLITS:
        if (out / split).is_dir():
            for p in (out / split).iterdir():
                p.unlink()


@dataclass(frozen=True)
class PackResult:
    out: Path
    manifest: dict
    seconds: float
    up_to_date: bool = False

    def summary(self) -> str:
        if self.up_to_date:
            return f"{self.out} already holds this pack (same files, seed and shard size): nothing written"
        parts = []
        total = 0
        for split, s in self.manifest["splits"].items():
            mb = sum(sh["bytes"] for sh in s["shards"]) / 1e6
            total += mb
            parts.append(f"{split} {s['samples']} samples in {len(s['shards'])} shard(s), {mb:.1f} MB")
        skipped = len(self.manifest["check"]["skipped"])
        return (
            f"packed {'; '.join(parts)}; {skipped} file(s) left out by the data check; "
            f"{total:.1f} MB in {self.seconds:.1f} s -> {self.out / MANIFEST}"
        )


def _usable(root: Path, cfg: DataConfig, progress: bool) -> tuple[dict[str, Split], list[dict]]:
    """The splits as training reads them (only files the data check keeps), and the check's verdicts."""
    from .usable import usable_splits

    # The data check always runs: a pack must never carry a file the loaders cannot decode.
    train, val, skipped = usable_splits(replace(cfg, root=str(root), check=True), progress=progress)
    verdicts = sorted(
        ({"path": _rel(p, root), "kind": k, "detail": d} for p, k, d in skipped.files), key=lambda v: v["path"]
    )
    return {"train": train, "val": val}, verdicts


def _write_split(
    root: Path, out: Path, split: str, items: list[Item], classes: Sequence[str], shard_bytes: int, bar
) -> dict:
    (out / split).mkdir(parents=True, exist_ok=True)
    shards: list[ShardRecord] = []
    shard_of: dict[str, str] = {}
    for number, group in enumerate(shard_groups(items, shard_bytes)):
        shards.append(_write_shard(out, split, number, group, classes))
        shard_of.update((it.key, shards[-1].file) for it in group)
        bar.update(len(group))
    buf = io.StringIO()
    rows = csv.writer(buf, delimiter="\t", lineterminator="\n")
    rows.writerow(["key", "label", "shard", "source"])
    rows.writerows([it.key, it.label, shard_of[it.key], _rel(it.source, root)] for it in items)
    listing_size, listing_digest = write_atomically(
        out / split / LISTING, lambda f: f.write(buf.getvalue().encode()), TMP
    )
    counts = Counter(it.label for it in items)
    return {
        "samples": len(items),
        "class_counts": {c: counts[i] for i, c in enumerate(classes)},
        "image_extensions": sorted({it.ext for it in items}),
        "listing": f"{split}/{LISTING}",
        "listing_bytes": listing_size,
        "listing_sha256": listing_digest,
        "shards": [vars(s) for s in shards],
    }


def _previous(out: Path, root: Path, force: bool) -> dict:
    """OUT's manifest ({} if none, or unreadable: no pack); refuses a pack of another source without --force."""
    if not (out / MANIFEST).is_file():
        return {}
    try:
        old = read_manifest(out)
    except DataError:
        return {}
    other = old.get("source", {}).get("root")
    if other != str(root) and not force:
        raise DataError(f"{out} holds a pack of {other}, not {root}; use --force to replace it")
    return old


def _prepare_out(out: Path, root: Path) -> None:
    """OUT exists and is writable, and holds nothing `data pack` would not write: checked before the data check runs."""
    if out == root or any(out == root / s or root / s in out.parents for s in SPLITS):
        # Inside a split it would be read as a class folder by the next scan.
        raise DataError(f"data pack: OUT {out} is ROOT or inside its train/ or val/; choose a folder outside them")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"data pack: cannot create OUT {out}: {exc.strerror}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise DataError(f"data pack: OUT {out} is not writable")
    _clear(out, dry_run=True)


def pack(
    root: str | Path,
    out: str | Path,
    *,
    shard_mb: float = 64.0,
    seed: int = 0,
    force: bool = False,
    cfg: DataConfig | None = None,
    progress: bool = False,
) -> PackResult:
    """Pack ROOT's train and val splits into OUT (see the module's docstring)."""
    start = time.perf_counter()
    root, out = Path(root).resolve(), Path(out).resolve()
    if not root.is_dir():
        raise DataError(f"data pack: ROOT {root} does not exist (a folder holding train/ and val/)")
    if shard_mb <= 0:
        raise DataError(f"data pack: --shard-size must be > 0 MB, got {shard_mb}")
    old = _previous(out, root, force)
    _prepare_out(out, root)
    splits, verdicts = _usable(root, cfg or DataConfig(), progress)
    items = {name: plan(splits[name], seed) for name in SPLITS}
    settings = {
        "seed": seed,
        "shard_bytes": int(shard_mb * 1e6),
        "source": {"root": str(root), "fingerprint": _fingerprint(root, items, verdicts)},
    }
    if old and all(old.get(k) == v for k, v in settings.items()):
        try:
            load(out)  # every file there at its size; else it is packed again
            return PackResult(out, old, time.perf_counter() - start, up_to_date=True)
        except DataError:
            pass
    try:
        manifest = _write_pack(root, out, items, splits["train"].classes, verdicts, settings, progress)
    except OSError as exc:
        raise DataError(f"data pack: cannot write {out}: {exc}") from None
    return PackResult(out, manifest, time.perf_counter() - start)


def _write_pack(
    root: Path,
    out: Path,
    items: dict[str, list[Item]],
    classes: Sequence[str],
    verdicts: list[dict],
    settings: dict,
    progress: bool,
) -> dict:
    from tqdm import tqdm

    _clear(out)
    total = sum(map(len, items.values()))
    with tqdm(total=total, unit="img", desc="data pack", file=sys.stderr, disable=not progress, leave=False) as bar:
        written = {
            name: _write_split(root, out, name, items[name], classes, settings["shard_bytes"], bar) for name in SPLITS
        }
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "classes": list(classes),
        **settings,
        "splits": written,
        "check": {
            "skipped": verdicts,
            "skipped_by_kind": dict(sorted(Counter(v["kind"] for v in verdicts).items())),
        },
    }
    for folder in (out / split for split in SPLITS):
        fsync_dir(folder)  # the shards' renames reach the disk before the manifest's can
    write_atomically(out / MANIFEST, lambda f: f.write((json.dumps(manifest, indent=1) + "\n").encode()), TMP)
    fsync_dir(out)
    return manifest


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("root", type=Path, help="data-set root holding train/ and val/ (class folders)")
    parser.add_argument("out", type=Path, help="folder for the shards, index files and manifest.json")
    parser.add_argument(
        "--shard-size", type=float, default=64.0, metavar="MB", help="largest shard, in MB (10^6 bytes); default 64"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the interleaved sample order")
    parser.add_argument("--force", action="store_true", help="replace a complete pack of another source in OUT")
    parser.add_argument(
        "--config", type=Path, help="YAML config whose data section sets the check's limits (data.max_pixels, ...)"
    )
    parser.add_argument(
        "--progress",
        choices=["auto", "bar", "none"],
        default="auto",
        help="progress bar on stderr: auto = only on a terminal",
    )


def run(args: argparse.Namespace) -> int:
    from ..config import load

    progress = args.progress == "bar" or (args.progress == "auto" and sys.stderr.isatty())
    result = pack(
        args.root,
        args.out,
        shard_mb=args.shard_size,
        seed=args.seed,
        force=args.force,
        cfg=load(args.config).data,
        progress=progress,
    )
    print(result.summary())
    return 0
