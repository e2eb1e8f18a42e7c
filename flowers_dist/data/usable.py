"""What training and evaluation read: the splits with only the files that decode, from the cached check."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..config import DataConfig
from . import default_workers, shards
from .check import CheckReport, check_splits, from_split, outside_probe
from .folder import DataError, Split, scan_dataset

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Skipped:
    """What the check left out, for the log line, metrics.jsonl and W&B."""

    count: int
    by_kind: dict[str, int]
    files: tuple[tuple[str, str, str], ...]  # (path, kind, detail)
    seconds: float
    probed: int
    cache_file: str | None
    checked: bool = True
    packed_from: str | None = None
    """A packed data set: the folder it was packed from, whose check's verdicts these are (nothing probed now)."""

    def line(self) -> str:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(self.by_kind.items()))
        if self.packed_from is not None:
            return (
                f"data check: packed data set, checked when packed from {self.packed_from}: "
                f"{self.count} file(s) left out" + (f" ({kinds})" if kinds else "")
            )
        if not self.checked:
            outside = f"; {self.count} file(s) outside class folders skipped" if self.count else ""
            return (
                "data check: off (data.check=false); the PyTorch loader skips unreadable files, DALI stops on one"
                + outside
            )
        where = f"; cache {self.cache_file}" if self.cache_file else "; cache not writable"
        return (
            f"data check: {self.count} file(s) skipped"
            + (f" ({kinds})" if kinds else "")
            + f", {self.seconds:.1f} s, {self.probed} probed{where}"
        )

    def record(self) -> dict:
        """The metrics.jsonl `data_check` event (a few files named; `flowers-dist data check` lists them all)."""
        return {
            "event": "data_check",
            "checked": self.checked,
            "skipped": self.count,
            "skipped_by_kind": self.by_kind,
            "skipped_files": [{"path": p, "kind": k, "detail": d} for p, k, d in self.files[:50]],
            "check_seconds": self.seconds,
            "probed": self.probed,
            **({"packed_from": self.packed_from} if self.packed_from is not None else {}),
        }


def _workers(cfg: DataConfig) -> int:
    # One process scans while the others wait, so it may use every core of the node.
    return default_workers(1) if cfg.num_workers < 0 else max(1, cfg.num_workers)


def _warn_each(files: tuple[tuple[str, str, str], ...]) -> None:
    for path, kind, detail in files:
        log.warning("skipping %s: %s: %s", path, kind, detail)


def _skipped(report: CheckReport, log_each: bool = True) -> Skipped:
    files = tuple((p.path, p.kind, p.detail) for _, p in report.skipped())
    if log_each:
        _warn_each(files)
    return Skipped(
        len(files),
        report.skipped_counts(),
        files,
        report.seconds,
        report.probed,
        str(report.cache_file) if report.cache_file else None,
    )


def _raise_fatal(report: CheckReport) -> None:
    if report.fatal:
        raise DataError(f"{report.fatal[0]} (`flowers-dist data check {report.root}` lists every problem)")


def _unchecked(*splits: Split, log_each: bool = True) -> Skipped:
    """data.check=false: nothing is probed, but images outside the class folders are still counted (no loader reads them)."""
    files = tuple((p.path, p.kind, p.detail) for p in (outside_probe(f) for s in splits for f in s.outside))
    if log_each:
        _warn_each(files)
    by_kind = {files[0][1]: len(files)} if files else {}
    return Skipped(len(files), by_kind, files, 0.0, 0, None, checked=False)


def usable_splits(cfg: DataConfig, progress: bool = False) -> tuple[Split, Split, Skipped]:
    """Train and val holding only the files both loaders decode (or everything, with data.check=false).

    A packed data set holds only the files its source's check kept: its manifest's verdicts are the
    record, nothing is probed; shards.load checks the shards' sizes, the indexes' and listings'
    checksums and each index against its tar (not the shards' checksums: `data check PACK` reads
    every byte, too slow for every start)."""
    if shards.is_packed(cfg.root):
        return packed_splits(cfg.root)
    train, val = scan_dataset(cfg.root)  # layout errors, as before
    if not cfg.check:
        return train, val, _unchecked(train, val)
    report = check_splits(
        Path(cfg.root),
        {"train": from_split("train", train), "val": from_split("val", val)},
        cfg,
        workers=_workers(cfg),
        progress=progress,
    )
    _raise_fatal(report)
    return report.usable("train"), report.usable("val"), _skipped(report)


def packed_splits(root: str | Path) -> tuple[Split, Split, Skipped]:
    """A pack's train and val, and the data check's verdicts from when it was packed."""
    packed = shards.load(root)
    missing = [name for name in ("train", "val") if name not in packed.splits]
    if missing:
        raise DataError(f"packed data set {root} has no {' or '.join(missing)} split; pack again with `data pack`")
    return shards.split(packed, "train"), shards.split(packed, "val"), pack_verdicts(packed)


def pack_verdicts(packed: shards.Packed) -> Skipped:
    check = packed.manifest.get("check", {})
    files = tuple((v["path"], v["kind"], v.get("detail", "")) for v in check.get("skipped", []))
    source = packed.manifest.get("source", {}).get("root", "?")
    return Skipped(len(files), dict(check.get("skipped_by_kind", {})), files, 0.0, 0, None, packed_from=source)


def usable_split(cfg: DataConfig, split: Split) -> tuple[Split, Skipped]:
    """One labelled folder (eval), checked the same way; no leakage check across splits.

    Its skipped files are not logged: the caller lists them (each file said once). A packed split
    was checked when packed: nothing is left out now."""
    if split.packed:
        return split, Skipped(0, {}, (), 0.0, 0, None, packed_from=str(split.root.parent))
    if not cfg.check:
        return split, _unchecked(split, log_each=False)
    # A data set's val/ shares the root's cache with training and `data check`; any other folder has its own.
    root = split.root.parent if split.root.name == "val" and (split.root.parent / "train").is_dir() else split.root
    report = check_splits(root, {"val": from_split("val", split)}, cfg, workers=_workers(cfg))
    _raise_fatal(report)
    return report.usable("val"), _skipped(report, log_each=False)


def shared(compute: Callable[[], object], is_main: bool, broadcast: Callable[[list], object]) -> object:
    """compute() on the main process only; every process gets its result, or raises its error.

    An error on the main process alone would leave the others waiting in the broadcast: it is
    sent like a result, and raised everywhere, so every rank exits the same way.
    """
    box: list = [None]
    if is_main:
        try:
            box[0] = compute()
        except DataError as exc:
            box[0] = exc
    broadcast(box)
    if isinstance(box[0], Exception):
        raise box[0]
    return box[0]
