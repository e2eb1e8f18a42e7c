"""train.record_samples: the samples each process trained, per epoch, written to the run folder and read back."""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path

FOLDER = "samples"
NAME = re.compile(r"^epoch-(\d+)\.rank-(\d+)\.from-(\d+)\.txt$")


def write_samples(run_dir: str | Path, epoch: int, rank: int, first_step: int, names: list[str]) -> Path:
    """One file per process and part of an epoch (a resumed epoch has a part from the step it resumed at).

    Written under a temporary name and renamed: a file that is there is whole.
    """
    folder = Path(run_dir) / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"epoch-{epoch:03d}.rank-{rank}.from-{first_step:06d}.txt"
    tmp = folder / f".{path.name}.tmp-{os.getpid()}"
    tmp.write_text("".join(f"{n}\n" for n in names))
    os.replace(tmp, path)
    return path


def read_samples(run_dir: str | Path, epoch: int) -> Counter[str]:
    """How often each sample was trained in `epoch`, over every process and part: coverage is every count 1."""
    counts: Counter[str] = Counter()
    folder = Path(run_dir) / FOLDER
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        m = NAME.match(path.name)
        if m and int(m.group(1)) == epoch:
            counts.update(path.read_text().split())
    return counts
