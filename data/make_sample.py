"""Regenerate data/flowers_quickstart, the quickstart's bundled photos, from the full flower_photos set.

A fixed, seeded choice of photographs per class and split (train from train, val from val, so
the 80/20 split of the full set is kept), each shrunk to SHORT_SIDE pixels on its shorter side
and saved as a baseline JPEG without metadata. `FILES.txt` in the output lists every source
file with the SHA-256 of its original bytes (as in the full set's SHA256SUMS), so a
regenerated sample can be checked against the committed one.

    python data/make_sample.py /path/to/flowers data/flowers_quickstart
"""

from __future__ import annotations

import argparse
import hashlib
import random
import shutil
from pathlib import Path

from PIL import Image

PER_CLASS = {"train": 160, "val": 24}  # 800 train + 120 val images over the 5 classes
SHORT_SIDE = 80  # the quickstart trains on 64 px crops and evaluates on a 73 px resize, 64 px centre crop
QUALITY = 90
SEED = 0


def choose(split_dir: Path, n: int, seed: int) -> list[Path]:
    """n files per class, the same ones on every machine: a seeded sample of the sorted listing."""
    files = sorted(p for p in split_dir.iterdir() if p.suffix.lower() == ".jpg")
    return sorted(random.Random(f"{seed}:{split_dir.parent.name}:{split_dir.name}").sample(files, n))


def shrink(src: Path, dst: Path) -> None:
    with Image.open(src) as img:
        img = img.convert("RGB")
        scale = SHORT_SIDE / min(img.size)
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img.resize(size, Image.Resampling.LANCZOS).save(dst, "JPEG", quality=QUALITY, optimize=True)


def make_sample(source: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out / "train", ignore_errors=True)
        shutil.rmtree(out / "val", ignore_errors=True)
    lines = []
    for split, n in PER_CLASS.items():
        for class_dir in sorted(p for p in (source / split).iterdir() if p.is_dir()):
            (out / split / class_dir.name).mkdir(parents=True, exist_ok=True)
            for src in choose(class_dir, n, SEED):
                rel = src.relative_to(source)
                shrink(src, out / rel)
                lines.append(f"{hashlib.sha256(src.read_bytes()).hexdigest()}  {rel}")
    (out / "FILES.txt").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="the full data set: <source>/{train,val}/<class>/*.jpg")
    parser.add_argument("out", type=Path, help="output folder (its train/ and val/ are replaced)")
    args = parser.parse_args()
    make_sample(args.source, args.out)


if __name__ == "__main__":
    main()
