"""Making a write survive a crash: what checkpoints, packs and staged copies share."""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable
from pathlib import Path


def fsync_dir(folder: Path) -> None:
    """Push a folder's entries to disk: the renames and links made in it survive a power loss or a killed node.

    A file's own fsync covers its bytes, not its name; writers that publish a file by renaming it
    (and a manifest after its shards) call this before the next step may rely on the name.
    """
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _HashingWriter(io.RawIOBase):
    """A file that hashes what is written to it (a pack's tar is checksummed as it goes, not read back)."""

    def __init__(self, f) -> None:
        self.f, self.digest, self.pos = f, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.f.write(data)
        self.digest.update(data)
        self.pos += len(data)
        return len(data)

    def tell(self) -> int:
        return self.pos


def write_atomically(path: Path, write: Callable[[io.RawIOBase], object], tmp_suffix: str = ".tmp") -> tuple[int, str]:
    """write(file) into path's temporary name, fsync, rename over path; returns (bytes, SHA-256).

    The caller fsyncs the folder (fsync_dir) when the name must survive a crash before its next step."""
    tmp = path.with_name(path.name + tmp_suffix)
    try:
        with open(tmp, "wb") as f:
            out = _HashingWriter(f)
            write(out)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out.pos, out.digest.hexdigest()
