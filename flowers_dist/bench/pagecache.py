"""Evict files from the page cache and measure how much of them is still resident, for cold-data benchmarks.

Eviction is `posix_fadvise(POSIX_FADV_DONTNEED)` per file, which needs no privileges. Residency
is measured without extra tools: each file is mapped read-only and `mincore(2)` (libc, through
ctypes) says which of its pages are in memory; this is what util-linux's `fincore` does. Since
Linux 5.2 `mincore` reports the page cache only for files the caller owns or may write (for
others it reports pages mapped by this process, which would read as cold whatever the cache
holds): such files count as unmeasured, and a figure that rests on them is not called cold.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import mmap
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

EVICTED_BELOW = 0.05
"""Largest resident fraction after eviction for a figure to count as cold (a prefetch may touch a few pages)."""


@dataclass(frozen=True)
class Residency:
    """Pages of a set of files in the page cache, over the pages of the files that could be measured."""

    files: int
    resident_pages: int
    total_pages: int
    unmeasured_files: int
    """Files mincore cannot report on (not ours to write, or a platform without mincore)."""

    @property
    def fraction(self) -> float | None:
        if self.unmeasured_files or self.total_pages == 0:
            return None
        return self.resident_pages / self.total_pages

    def record(self) -> dict:
        return {
            "files": self.files,
            "resident_pages": self.resident_pages,
            "total_pages": self.total_pages,
            "unmeasured_files": self.unmeasured_files,
            "resident_fraction": self.fraction,
        }


def evict(paths: Iterable[Path]) -> None:
    """Drop every page of every file from the page cache."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            # The kernel drops clean pages only: a file just written (a synthetic set) is flushed first.
            with contextlib.suppress(OSError):
                os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None or not hasattr(os, "posix_fadvise"):
        return None
    libc = ctypes.CDLL(name, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
    return libc


def _measurable(path: Path) -> bool:
    # The kernel's own rule for reporting the page cache to mincore (mm/mincore.c, can_do_mincore).
    return os.stat(path).st_uid == os.geteuid() or os.access(path, os.W_OK)


def _resident_pages(libc: ctypes.CDLL, path: Path, page: int) -> tuple[int, int]:
    """(resident, total) pages of one file."""
    size = os.stat(path).st_size
    pages = (size + page - 1) // page
    if pages == 0:
        return 0, 0
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"mmap of {path} failed")
        try:
            vec = (ctypes.c_ubyte * pages)()
            if libc.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), f"mincore of {path} failed")
            return sum(v & 1 for v in vec), pages
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)


def residency(paths: Iterable[Path]) -> Residency:
    """How much of the files' pages is in the page cache (mapping a file does not read it)."""
    libc = _libc()
    page = mmap.PAGESIZE
    files = resident = total = unmeasured = 0
    for path in paths:
        files += 1
        try:
            if libc is None or not _measurable(path):
                raise OSError("not measurable")
            r, t = _resident_pages(libc, path, page)
        except OSError:  # some file systems cannot be mapped (FUSE with direct I/O)
            unmeasured += 1
            continue
        resident += r
        total += t
    return Residency(files, resident, total, unmeasured)


def mapped(paths: list[Path]) -> list[Path]:
    """The files this process holds mapped (a reader's mmap): their pages stay whatever the advice."""
    maps = Path("/proc/self/maps")
    if not maps.is_file():
        return []
    held = {line.split(maxsplit=5)[5] for line in maps.read_text().splitlines() if len(line.split(maxsplit=5)) == 6}
    return [p for p in paths if str(Path(p).resolve()) in held]


def evict_and_check(paths: list[Path], attempts: int = 3, pause_s: float = 0.1) -> dict:
    """Evict the files, then measure them: the record of one cold epoch's start.

    A loader that reads ahead (DALI's prefetch queue, DataLoader workers) may read the next
    epoch's first files again just after an eviction, until its queue is full: the eviction is
    repeated, after a pause, up to `attempts` times. `cold` is True only where the measured
    resident fraction is below EVICTED_BELOW; a file system that ignores the advice (some network
    and FUSE file systems) or files that cannot be measured leave it False, and the figure must
    not be reported as cold.
    """
    for attempt in range(1, attempts + 1):
        evict(paths)
        after = residency(paths)
        fraction = after.fraction
        cold = fraction is not None and fraction < EVICTED_BELOW
        if cold or after.unmeasured_files or attempt == attempts:
            return {**after.record(), "cold": cold, "evictions": attempt, "mapped_files": len(mapped(paths))}
        time.sleep(pause_s)
    raise AssertionError("unreachable")
