"""Check a data set before training: probe every file the loaders would read, in parallel, and report.

The verdicts per file come from probe.py and are cached (check_cache.py); this module lists
the files, runs the probes in a process pool with a progress bar, finds identical bytes
within a split and across train and val, names images outside the class folders (no label:
no loader reads them), counts per class, and decides the exit code:
0 clean (readable peculiarities are noted, not problems), 1 only problems training skips,
2 problems that stop training (a missing folder, an empty class, class lists that differ,
a class left with no usable image).
"""

from __future__ import annotations

import multiprocessing
import sys
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..config import DataConfig
from .check_cache import CheckCache, cache_path
from .folder import IMAGE_SUFFIXES, Split, images_outside_classes
from .probe import DECODERS, NOTES, Probe, probe_many

SPLITS = ("train", "val")
CHUNK = 32  # files per pool task: big enough to amortise pickling, small enough for a smooth bar


@dataclass
class SplitFiles:
    """One split's class list and candidate files (labels index classes), before probing."""

    name: str
    root: Path
    classes: list[str]
    files: list[Path]
    labels: list[int]
    outside: list[Path] = field(default_factory=list)
    """Images directly in the split folder, in no class folder: named, never probed (no loader reads them)."""


@dataclass
class CheckReport:
    root: Path
    splits: dict[str, SplitFiles]
    probes: dict[str, list[Probe]]  # split -> one verdict per file, in the split's file order
    fatal: list[str] = field(default_factory=list)
    seconds: float = 0.0
    probed: int = 0
    cached: int = 0
    cache_file: Path | None = None
    outside: dict[str, list[Probe]] = field(default_factory=dict)  # split -> its images outside class folders

    @property
    def exit_code(self) -> int:
        if self.fatal:
            return 2
        return 1 if self.skipped() else 0

    def skipped(self) -> list[tuple[str, Probe]]:
        return [(s, p) for s, ps in self.probes.items() for p in ps if p.skipped] + [
            (s, p) for s, ps in self.outside.items() for p in ps
        ]

    def skipped_counts(self) -> dict[str, int]:
        return dict(Counter(p.kind for _, p in self.skipped()))

    def usable(self, name: str) -> Split:
        """The split with only the files training keeps."""
        s = self.splits[name]
        keep = [(f, lab) for f, lab, p in zip(s.files, s.labels, self.probes[name]) if not p.skipped]
        return Split(s.root, tuple(s.classes), tuple(f for f, _ in keep), tuple(lab for _, lab in keep))

    def class_counts(self, name: str) -> dict[str, tuple[int, int]]:
        """class -> (files, usable files)."""
        s = self.splits[name]
        counts = {c: [0, 0] for c in s.classes}
        for label, p in zip(s.labels, self.probes[name]):
            counts[s.classes[label]][0] += 1
            counts[s.classes[label]][1] += not p.skipped
        return {c: (n, u) for c, (n, u) in counts.items()}

    def rel(self, path: str | Path) -> str:
        try:
            return str(Path(path).relative_to(self.root))
        except ValueError:
            return str(path)

    def to_dict(self) -> dict:
        return {
            "root": str(self.root),
            "exit_code": self.exit_code,
            "fatal": self.fatal,
            "seconds": self.seconds,
            "probed": self.probed,
            "from_cache": self.cached,
            "cache_file": str(self.cache_file) if self.cache_file else None,
            "skipped_counts": self.skipped_counts(),
            "classes": {
                s: {c: {"files": n, "usable": u} for c, (n, u) in self.class_counts(s).items()} for s in self.splits
            },
            "files": [
                {"split": s, **p.to_dict(), "decoders": DECODERS.get(p.kind, "")}
                for s, ps in [*self.probes.items(), *self.outside.items()]
                for p in ps
                if p.kind != "ok"
            ],
        }

    def format(self) -> str:
        total = sum(len(ps) for ps in self.probes.values())
        lines = [
            f"data check of {self.root}: {total} files ("
            + ", ".join(f"{len(ps)} {s}" for s, ps in self.probes.items())
            + f"), {self.seconds:.1f} s ({self.probed} probed, {self.cached} from the cache"
            + (f" {self.cache_file}" if self.cache_file else "")
            + ")"
        ]
        names = [s for s in SPLITS if s in self.splits]
        if names:
            counts = {s: self.class_counts(s) for s in names}
            classes = sorted({c for s in names for c in counts[s]})
            width = max(12, *(len(c) for c in classes)) if classes else 12
            lines.append("per class (files / usable): " + "  ".join(names))
            for c in classes:
                cells = [
                    f"{counts[s][c][0]:>5} / {counts[s][c][1]:<5}" if c in counts[s] else "    missing  " for s in names
                ]
                lines.append(f"  {c:<{width}} " + "  ".join(cells))
        if self.fatal:
            lines.append(f"problems that stop training ({len(self.fatal)}):")
            lines += [f"  {m}" for m in self.fatal]
        skipped = self.skipped()
        if skipped:
            lines.append(f"skipped by training ({len(skipped)}):")
            lines += [f"  {self.rel(p.path)}: {p.kind}: {p.detail}" for _, p in skipped]
        noted = [p for ps in self.probes.values() for p in ps if p.kind in NOTES]
        if noted:
            lines.append(f"readable, noted ({len(noted)}):")
            lines += [f"  {self.rel(p.path)}: {', '.join(p.notes)}: {p.detail}" for p in noted]
        kinds = sorted({p.kind for ps in [*self.probes.values(), *self.outside.values()] for p in ps if p.kind != "ok"})
        if kinds:
            lines.append("what the decoders do with each kind found:")
            lines += [f"  {k}: {DECODERS[k]}" for k in kinds]
        verdict = {0: "clean", 1: "training skips the files above", 2: "training would stop"}[self.exit_code]
        lines.append(f"exit {self.exit_code}: {verdict}")
        return "\n".join(lines) + "\n"


def list_split(split_dir: Path, name: str) -> tuple[SplitFiles, list[str]]:
    """Every file a loader would read (image suffix, including links that lead nowhere), and layout problems."""
    if not split_dir.is_dir():
        return SplitFiles(name, split_dir, [], [], []), [f"data folder {split_dir} does not exist"]
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    problems = (
        []
        if classes
        else [f"data folder {split_dir} has no class sub-folders (expected {split_dir}/<class>/<image>.jpg)"]
    )
    files: list[Path] = []
    labels: list[int] = []
    for label, c in enumerate(classes):
        found = sorted(p for p in (split_dir / c).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir())
        if not found:
            problems.append(f"class folder {split_dir / c} holds no images (an empty class)")
        files += found
        labels += [label] * len(found)
    return SplitFiles(name, split_dir, classes, files, labels, images_outside_classes(split_dir)), problems


def from_split(name: str, split: Split) -> SplitFiles:
    return SplitFiles(name, split.root, list(split.classes), list(split.files), list(split.labels), list(split.outside))


def outside_probe(path: Path) -> Probe:
    """The verdict on an image outside every class folder (not probed: no loader would read it)."""
    return Probe(
        str(path),
        "outside_class_folders",
        f"directly in {path.parent.name}/, outside any class folder: it has no label",
    )


def _probe_all(paths: list[str], cfg: DataConfig, workers: int, progress: bool) -> list[Probe]:
    return run_chunked(probe_many, paths, cfg, workers, progress, desc="data check", unit="file")


def run_chunked(
    fn: Callable[[tuple[list, int, int]], list],
    items: list,
    cfg: DataConfig,
    workers: int,
    progress: bool,
    desc: str,
    unit: str,
) -> list:
    """fn((chunk, data.max_pixels, data.min_side)) over CHUNK-item chunks of `items`, in `workers` processes,
    with a progress bar; the chunks' results joined in the items' order."""
    from tqdm import tqdm

    chunks = [items[i : i + CHUNK] for i in range(0, len(items), CHUNK)]
    out: dict[int, list] = {}
    with tqdm(total=len(items), unit=unit, desc=desc, file=sys.stderr, disable=not progress, leave=False) as bar:
        if workers <= 1 or len(chunks) <= 1:
            for i, chunk in enumerate(chunks):
                out[i] = fn((chunk, cfg.max_pixels, cfg.min_side))
                bar.update(len(chunk))
        else:
            # fork: the children run PIL only, never torch, so the torch thread pools a training process
            # holds cannot deadlock them; spawn would re-run the caller's main script in every child.
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
                futures = {pool.submit(fn, (chunk, cfg.max_pixels, cfg.min_side)): i for i, chunk in enumerate(chunks)}
                for future in as_completed(futures):
                    out[futures[future]] = future.result()
                    bar.update(len(chunks[futures[future]]))
    return [result for i in range(len(chunks)) for result in out[i]]


def _mark_copies(probes: dict[str, list[Probe]], root: Path) -> None:
    """Identical bytes: a repeat within a split is a duplicate, a val file equal to a train file a leak."""
    seen: dict[str, dict[str, str]] = {}
    for name in probes:
        mine = seen.setdefault(name, {})
        for i, p in enumerate(probes[name]):
            if p.skipped or not p.digest:
                continue
            rel = lambda q: str(Path(q).relative_to(root)) if Path(q).is_relative_to(root) else q  # noqa: E731
            if name != "train" and p.digest in seen.get("train", {}):
                probes[name][i] = replace(p, kind="leak", detail=f"same bytes as {rel(seen['train'][p.digest])}")
            elif p.digest in mine:
                first = mine[p.digest]
                # The same photo under two classes is a label conflict, not just a repeat.
                conflict = (
                    " (another class: conflicting labels)"
                    if Path(first).parent.name != Path(p.path).parent.name
                    else ""
                )
                probes[name][i] = replace(p, kind="duplicate", detail=f"same bytes as {rel(first)}{conflict}")
            else:
                mine[p.digest] = p.path


def check_splits(
    root: Path,
    splits: dict[str, SplitFiles],
    cfg: DataConfig,
    *,
    workers: int,
    progress: bool = False,
    fatal: list[str] | None = None,
) -> CheckReport:
    """Probe the files of the given splits (cached), mark copies, and find classes left without images."""
    start = time.perf_counter()
    cache = CheckCache(cache_path(root, cfg.check_cache), (cfg.max_pixels, cfg.min_side))
    paths = [str(f) for s in splits.values() for f in s.files]
    known = {p: cache.get(p) for p in paths}
    todo = [p for p, v in known.items() if v is None]
    fresh = dict(zip(todo, _probe_all(todo, cfg, workers, progress))) if todo else {}
    cache.put(list(fresh.values()))
    saved = cache.save() if todo else True
    probes = {name: [known[str(f)] or fresh[str(f)] for f in s.files] for name, s in splits.items()}
    _mark_copies(probes, root)
    report = CheckReport(
        root,
        splits,
        probes,
        list(fatal or []),
        probed=len(todo),
        cached=len(paths) - len(todo),
        cache_file=cache.path if saved else None,
        outside={name: [outside_probe(f) for f in s.outside] for name, s in splits.items() if s.outside},
    )
    for name, s in splits.items():
        for c, (n, usable) in report.class_counts(name).items():
            if n and not usable:
                report.fatal.append(f"class folder {s.root / c} has no usable image ({n} skipped)")
    report.seconds = time.perf_counter() - start
    return report


def check_dataset(root: str | Path, cfg: DataConfig, *, workers: int, progress: bool = False) -> CheckReport:
    """`flowers-dist data check ROOT`: every layout problem and every file, not just the first problem.

    ROOT holds train/ and val/, or is itself a folder of class folders (what eval and predict read)."""
    root = Path(root)
    if not root.is_dir():
        return CheckReport(root, {}, {}, [f"data root {root} does not exist (run `flowers-dist data fetch {root}`)"])
    if not any((root / name).is_dir() for name in SPLITS):  # a folder of class folders, as eval takes
        split, fatal = list_split(root, root.name)
        return check_splits(root, {root.name: split}, cfg, workers=workers, progress=progress, fatal=fatal)
    splits, fatal = {}, []
    for name in SPLITS:
        splits[name], problems = list_split(root / name, name)
        fatal += problems
    train, val = splits["train"].classes, splits["val"].classes
    if train and val and train != val:
        missing = sorted(set(val) - set(train))
        if missing:
            fatal.append(f"val classes missing from train: {', '.join(missing)}")
        extra = sorted(set(train) - set(val))
        if extra:
            fatal.append(f"train classes missing from val: {', '.join(extra)}")
    return check_splits(root, splits, cfg, workers=workers, progress=progress, fatal=fatal)
