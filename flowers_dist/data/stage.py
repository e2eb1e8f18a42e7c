"""`data.stage_to`: copy a packed data set to node-local disk once, verified against its manifest, and reuse it.

The copy lands in `DIR/pack-<the first 16 hex digits of the manifest's SHA-256>/`, so a changed
pack never reuses an old copy. The manifest is written last (atomically, after every copied file
passed its size and SHA-256 check and was fsynced): a folder with a manifest equal to the source's
is a complete, verified copy, and a requeued job reuses it after checking sizes only (hashing
again would read every byte, the cost staging is there to avoid). A folder without one is a
partial copy: it is deleted and copied again. Free space is checked before the first byte is
copied. A lock file per copy keeps two jobs on one node from copying into the same folder.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..durable import fsync_dir, write_atomically
from ..errors import DataError
from . import shards

PREFIX = "pack-"
TMP = ".staging"
GB = 1e9


@dataclass(frozen=True)
class Staged:
    """Where a pack was staged, and what it cost: `copied` bytes in `seconds`, or 0 when a copy was reused."""

    root: Path
    copied: int
    seconds: float
    reused: bool

    def line(self) -> str:
        if self.reused:
            return f"data.stage_to: reused the verified copy in {self.root} ({self.seconds:.1f} s to check sizes)"
        return f"data.stage_to: staged {self.copied / 1e6:.0f} MB to {self.root} in {self.seconds:.1f} s, verified"


def expand(stage_to: str) -> Path:
    """The folder a `data.stage_to` value names, environment variables and ~ expanded; an unset variable is an error."""
    expanded = os.path.expanduser(os.path.expandvars(stage_to))
    if "$" in expanded:
        raise DataError(f"data.stage_to={stage_to}: an environment variable in it is not set (expanded: {expanded})")
    return Path(expanded).absolute()


def files(manifest: dict) -> list[tuple[str, int, str]]:
    """Every file a pack holds besides its manifest, as (path relative to the pack, bytes, SHA-256)."""
    try:
        out = []
        for part in manifest["splits"].values():
            for sh in part["shards"]:
                out.append((sh["file"], sh["bytes"], sh["sha256"]))
                out.append((sh["index"], sh["index_bytes"], sh["index_sha256"]))
            out.append((part["listing"], part["listing_bytes"], part["listing_sha256"]))
        return out
    except (KeyError, TypeError) as exc:
        raise DataError(f"pack manifest lacks a field ({exc}); pack again with `flowers-dist data pack`") from None


def needed_bytes(manifest: dict, manifest_bytes: int = 0) -> int:
    """The space a staged copy takes: every shard, index and listing, plus the manifest itself."""
    return sum(size for _, size, _ in files(manifest)) + manifest_bytes


def destination(pack_root: str | Path, stage_to: str) -> Path:
    """Where `stage` puts this pack under `stage_to`: named by the manifest's digest (the same on every node)."""
    pack_root = Path(pack_root)
    if not shards.is_packed(pack_root):
        raise DataError(
            f"data.stage_to needs a packed data set: run `flowers-dist data pack {pack_root} OUT` first "
            f"and set data.root=OUT ({pack_root} has no {shards.MANIFEST})"
        )
    shards.read_manifest(pack_root)  # the format and version, in one line, before a byte is copied
    digest = hashlib.sha256((pack_root / shards.MANIFEST).read_bytes()).hexdigest()
    return expand(stage_to) / f"{PREFIX}{digest[:16]}"


def is_complete(staged: Path, source_manifest: bytes) -> bool:
    """A copy that finished: its manifest is the source's, byte for byte, and every file is there at its size."""
    try:
        if (staged / shards.MANIFEST).read_bytes() != source_manifest:
            return False
        shards.load(staged, verify=False)
    except (OSError, DataError):
        return False
    return True


def free_bytes(folder: Path) -> int:
    """Free space on the file system that holds `folder`, or would hold it (its nearest existing parent)."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def _copy_verified(src: Path, dst: Path, size: int, sha256: str, rel: str, pack_root: Path) -> None:
    """Copy, fsync, then read the copy back: what is on the node-local disk is what the manifest says."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    with open(dst, "rb") as f:
        os.fsync(f.fileno())
    actual = dst.stat().st_size
    if actual != size:
        raise DataError(
            f"data.stage_to: staged {rel} is {actual} bytes, the manifest of {pack_root} says {size} (source truncated?)"
        )
    if shards.sha256_file(dst) != sha256:
        raise DataError(
            f"data.stage_to: staged {rel} fails its SHA-256 check against the manifest of {pack_root} (source corrupted?)"
        )


@contextmanager
def _locked(dest: Path) -> Iterator[None]:
    """One copier per destination on a node, also across jobs (two jobs sharing /tmp)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.with_name(dest.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def stage(pack_root: str | Path, stage_to: str) -> Staged:
    """Copy the pack at `pack_root` under `stage_to` (see the module's docstring), or reuse a complete copy."""
    start = time.perf_counter()
    pack_root = Path(pack_root)
    dest = destination(pack_root, stage_to)
    source_manifest = (pack_root / shards.MANIFEST).read_bytes()
    manifest = shards.read_manifest(pack_root)
    need = needed_bytes(manifest, len(source_manifest))
    try:
        if is_complete(dest, source_manifest):  # the common requeue: no lock needed to read
            return Staged(dest, 0, time.perf_counter() - start, reused=True)
        free = free_bytes(dest)
        if free < need - _partial_bytes(dest):
            raise DataError(
                f"data.stage_to={stage_to}: needs {need / GB:.2f} GB, {free / GB:.2f} GB free on {dest.parent}"
            )
        with _locked(dest):
            if is_complete(dest, source_manifest):  # another job on this node finished it while we waited
                return Staged(dest, 0, time.perf_counter() - start, reused=True)
            _copy(pack_root, dest, manifest, source_manifest)
    except OSError as exc:
        raise DataError(f"data.stage_to={stage_to}: cannot copy {pack_root} to {dest}: {exc}") from None
    return Staged(dest, need, time.perf_counter() - start, reused=False)


def _partial_bytes(dest: Path) -> int:
    """The bytes a partial copy holds: deleted before copying, so they count as free."""
    if not dest.is_dir():
        return 0
    return sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())


def _copy(pack_root: Path, dest: Path, manifest: dict, source_manifest: bytes) -> None:
    shutil.rmtree(dest, ignore_errors=True)  # a partial or stale copy: nothing of it is trusted
    dest.mkdir(parents=True)
    try:
        for rel, size, sha256 in files(manifest):
            _copy_verified(pack_root / rel, dest / rel, size, sha256, rel, pack_root)
        for folder in {(dest / rel).parent for rel, _, _ in files(manifest)}:
            fsync_dir(folder)  # the files' names reach the disk before the manifest's can
        write_atomically(dest / shards.MANIFEST, lambda f: f.write(source_manifest), TMP)
        fsync_dir(dest)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)  # a failed copy frees the node's disk
        raise


SLURM_STAGE_TO = "$SLURM_TMPDIR/flowers-dist"
"""What launch/slurm.sbatch stages to on a cluster that sets SLURM_TMPDIR (expanded by each process, on its node)."""


def slurm_default(train_args: list[str]) -> str | None:
    """The override launch/slurm.sbatch adds to `train TRAIN_ARGS`: data.stage_to on node-local disk, or None.

    Only for a packed data.root (a folder of class folders cannot be staged) and only when neither
    the arguments nor the config set data.stage_to (`data.stage_to=` turns it off). A config that
    does not load gets None: training then says what is wrong with it, in one line.
    """
    from .. import config, resume_check

    overrides = [a for a in train_args if "=" in a and not a.startswith("-")]
    if any(a.startswith("data.stage_to=") for a in overrides):
        return None
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--config", type=Path)
    parser.add_argument("--resume", type=Path)
    known, _ = parser.parse_known_args(train_args)
    try:
        if known.resume is not None:
            earlier = resume_check.previous_overrides(known.resume)
            cfg = config.load(known.config or known.resume / "config.yaml", [*earlier, *overrides])
        else:
            cfg = config.load(known.config, overrides)
    except Exception:  # training reports the config's problem itself, in one line
        return None
    if cfg.data.stage_to or not shards.is_packed(cfg.data.root):
        return None
    return f"data.stage_to={SLURM_STAGE_TO}"


if __name__ == "__main__":  # `python -m flowers_dist.data.stage TRAIN_ARGS...`, from launch/slurm.sbatch
    override = slurm_default(sys.argv[1:])
    if override:
        print(override)
