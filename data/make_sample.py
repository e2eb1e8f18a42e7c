"""Regenerate data/flowers_quickstart, the quickstart's bundled photos, from the full flower_photos set.

A fixed, seeded choice of photographs per class and split (train from train, val from val, so
the 80/20 split of the full set is kept), each shrunk to SHORT_SIDE pixels on its shorter side
and saved as a baseline JPEG without metadata. No photo is taken twice: a file whose original
bytes, or whose shrunk bytes, equal those of a file already taken (in any class or split; the
full set holds a few such copies) is passed over for the next in the seeded order, so
`flowers-dist data check` finds no duplicate and no leak. `FILES.txt` in the output lists
every source file with the SHA-256 of its original bytes (as in the full set's SHA256SUMS), so
a regenerated sample can be checked against the committed one.

    python data/make_sample.py /path/to/flowers data/flowers_quickstart
"""

from __future__ import annotations

import argparse
import hashlib
import io
import random
import shutil
from pathlib import Path

from PIL import Image

PER_CLASS = {"train": 160, "val": 24}  # 800 train + 120 val images over the 5 classes
SHORT_SIDE = 80  # the quickstart trains on 64 px crops and evaluates on a 73 px resize, 64 px centre crop
QUALITY = 90
SEED = 0


def seeded_order(split_dir: Path, seed: int) -> list[Path]:
    """Every photo of a class folder in a seeded order, the same on every machine.

    A full-length random.sample of the sorted listing: its first n are what `sample(files, n)`
    draws, so a class without copies keeps exactly the files it had before copies were skipped.
    """
    files = sorted(p for p in split_dir.iterdir() if p.suffix.lower() == ".jpg")
    return random.Random(f"{seed}:{split_dir.parent.name}:{split_dir.name}").sample(files, len(files))


def shrink(src: Path) -> bytes:
    """The photo with its shorter side at SHORT_SIDE, as baseline JPEG bytes without metadata."""
    with Image.open(src) as img:
        img = img.convert("RGB")
        scale = SHORT_SIDE / min(img.size)
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        buffer = io.BytesIO()
        img.resize(size, Image.Resampling.LANCZOS).save(buffer, "JPEG", quality=QUALITY, optimize=True)
        return buffer.getvalue()


def take_distinct(candidates: list[Path], n: int, seen: set[str]) -> list[tuple[Path, str, bytes]]:
    """The first n candidates whose source bytes and shrunk bytes are both new to `seen` (which they join):
    (source, SHA-256 of the source, shrunk bytes), sorted by path."""
    taken = []
    for src in candidates:
        if len(taken) == n:
            break
        source_digest = hashlib.sha256(src.read_bytes()).hexdigest()
        small = shrink(src)
        digests = {source_digest, "shrunk:" + hashlib.sha256(small).hexdigest()}
        if digests & seen:
            print(f"skipping {src}: a copy of a photo already taken")
            continue
        seen |= digests
        taken.append((src, source_digest, small))
    if len(taken) < n:
        raise SystemExit(f"{candidates[0].parent}: only {len(taken)} distinct photos, {n} wanted")
    return sorted(taken)


def make_sample(source: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out / "train", ignore_errors=True)
        shutil.rmtree(out / "val", ignore_errors=True)
    lines, seen = [], set()  # seen spans every class and split: a copy across them is a conflict or a leak
    for split, n in PER_CLASS.items():
        for class_dir in sorted(p for p in (source / split).iterdir() if p.is_dir()):
            (out / split / class_dir.name).mkdir(parents=True, exist_ok=True)
            for src, digest, small in take_distinct(seeded_order(class_dir, SEED), n, seen):
                rel = src.relative_to(source)
                (out / rel).write_bytes(small)
                lines.append(f"{digest}  {rel}")
    (out / "FILES.txt").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="the full data set: <source>/{train,val}/<class>/*.jpg")
    parser.add_argument("out", type=Path, help="output folder (its train/ and val/ are replaced)")
    args = parser.parse_args()
    make_sample(args.source, args.out)


if __name__ == "__main__":
    main()
