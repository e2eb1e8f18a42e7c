"""Making a write survive a crash: what checkpoints, packs and staged copies share."""

from __future__ import annotations

import os
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
