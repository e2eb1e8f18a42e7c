"""Move the files a check skips out of the data set (never deleting them), and put them back from the manifest."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from .check import CheckReport
from .folder import DataError

MANIFEST = "manifest.json"


def quarantine(report: CheckReport, dest: Path) -> Path:
    """Move every skipped file to dest/<split>/<class>/<name>; returns the manifest that can undo it."""
    dest = Path(dest)
    if dest.resolve().is_relative_to(report.root.resolve()):
        raise DataError(f"--quarantine {dest} is inside the data set {report.root}; choose a folder outside it")
    manifest = dest / MANIFEST
    entries = json.loads(manifest.read_text())["moved"] if manifest.is_file() else []
    for split, probe in report.skipped():
        src = Path(probe.path)
        origin = src.absolute()  # the link itself for a symlink, not where it points
        target = dest / split / src.parent.name / src.name
        n = 1
        while os.path.lexists(target):  # an earlier quarantine of a file with the same name
            target = target.with_name(f"{src.stem}.{n}{src.suffix}")
            n += 1
        target.parent.mkdir(parents=True, exist_ok=True)
        # rename, not copy: a symlink (even a loop) moves as the link itself; across file systems fall back.
        try:
            os.rename(src, target)
        except OSError as exc:
            if exc.errno != 18:  # EXDEV: another file system
                raise DataError(f"could not move {src} to {target}: {exc.strerror}") from None
            shutil.move(str(src), str(target))
        entries.append(
            {
                "from": str(origin),
                "to": str(target.absolute()),
                "kind": probe.kind,
                "detail": probe.detail,
                "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
        )
    dest.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps({"root": str(report.root.absolute()), "moved": entries}, indent=1) + "\n")
    return manifest


def restore(manifest: Path) -> tuple[int, list[str]]:
    """Move every file of the manifest back where it was; returns (restored, problems). Never overwrites."""
    manifest = Path(manifest)
    try:
        data = json.loads(manifest.read_text())
        entries = data["moved"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"--restore {manifest}: not a quarantine manifest ({exc.__class__.__name__})") from None
    restored, problems, left = 0, [], []
    for entry in entries:
        src, back = Path(entry["to"]), Path(entry["from"])
        if not os.path.lexists(src):
            problems.append(f"{src} is no longer in the quarantine")
            left.append(entry)
        elif os.path.lexists(back):
            problems.append(f"{back} exists again; {src} left in the quarantine")
            left.append(entry)
        else:
            back.parent.mkdir(parents=True, exist_ok=True)
            os.rename(src, back)
            restored += 1
    data["moved"] = left
    manifest.write_text(json.dumps(data, indent=1) + "\n")
    return restored, problems
