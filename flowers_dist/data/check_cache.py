"""The cache of `data check` verdicts, keyed by path, size and mtime, so a restart does not re-decode the data set.

Where it lives: `data.check_cache` when set; else a file in the data root when that folder is
writable and not marked read-only by its mode bits (the cache then follows the data and serves
every run and every `data check` of it, where a file in one run folder would make each new run
scan again); else ~/.cache/flowers-dist (or $XDG_CACHE_HOME), named after the root's path, for
read-only data such as a shared copy.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .probe import Probe

CACHE_NAME = ".flowers-dist-check.json"
VERSION = 1


def cache_path(root: Path, configured: str = "") -> Path:
    if configured:
        return Path(configured)
    # A folder without write bits is read-only by intent even where root could write into it (a shared copy).
    if os.access(root, os.W_OK) and root.stat().st_mode & 0o222:
        return root / CACHE_NAME
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "flowers-dist"
    return base / f"check-{hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]}.json"


def _stamp(path: str) -> tuple[int, int] | None:
    """(size, mtime_ns) of the file a path names, following links; None when it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


class CheckCache:
    """Probes by path, valid while the file's size and mtime and the size limits are unchanged."""

    def __init__(self, path: Path, limits: tuple[int, int]):
        self.path, self.limits = path, list(limits)
        self.entries: dict[str, list] = {}
        try:
            data = json.loads(path.read_text())
            if data.get("version") == VERSION and data.get("limits") == self.limits:
                self.entries = data["entries"]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass  # no cache, or an unreadable one: scan again

    def get(self, path: str) -> Probe | None:
        entry = self.entries.get(os.path.abspath(path))
        stamp = _stamp(path)
        if entry is None or stamp is None or list(stamp) != entry[0]:
            return None  # unstat-able files (symlink loops) are probed again: cheap, and they may be fixed
        return Probe.from_dict(entry[1])

    def put(self, probes: list[Probe]) -> None:
        for p in probes:
            stamp = _stamp(p.path)
            if stamp is not None:
                self.entries[os.path.abspath(p.path)] = [list(stamp), p.to_dict()]

    def save(self) -> bool:
        """Write the cache atomically, without entries of files that are gone; False when it cannot be written."""
        self.entries = {k: v for k, v in self.entries.items() if _stamp(k) is not None}
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps({"version": VERSION, "limits": self.limits, "entries": self.entries}))
            os.replace(tmp, self.path)  # readers see the old file or the new one, never half of one
            return True
        except OSError:
            tmp.unlink(missing_ok=True)
            return False
