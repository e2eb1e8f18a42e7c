"""Make each kind of broken or unusual image file from real photos, for the data-check and loader tests."""

from __future__ import annotations

import io
import os
import random
import shutil
from pathlib import Path

from PIL import Image

HUGE_SIDE = 20000


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85, **kw)
    return buf.getvalue()


def declare_size(jpeg: bytes, width: int, height: int) -> bytes:
    """The same JPEG with its frame header (SOF) claiming another size: a cheap 'huge' file."""
    data = bytearray(jpeg)
    i = 2
    while i < len(data):
        marker, length = data[i + 1], int.from_bytes(data[i + 2 : i + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOFn (not DHT, JPG, DAC)
            data[i + 5 : i + 7] = height.to_bytes(2, "big")
            data[i + 7 : i + 9] = width.to_bytes(2, "big")
            return bytes(data)
        i += 2 + length
    raise ValueError("no SOF marker")


def with_exif_orientation(img: Image.Image, orientation: int = 6) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _jpeg(img, exif=exif.tobytes())


def broken_files(photo: Path) -> dict[str, bytes | None]:
    """File name -> bytes, one per kind (None: a symlink loop, made by write_broken). Names say the kind."""
    raw = photo.read_bytes()
    img = Image.open(photo).convert("RGB")
    garbled = bytearray(raw)
    rng = random.Random(0)
    garbled[20:620] = bytes(rng.randrange(256) for _ in range(600))  # header segments overwritten after SOI
    png = io.BytesIO()
    img.save(png, "PNG")
    return {
        "truncated.jpg": raw[: len(raw) * 6 // 10],
        "zero_bytes.jpg": b"",
        "text.jpg": b"This is not an image; it is a text file with a .jpg name.\n" * 4,
        "png_named.jpg": png.getvalue(),
        "cmyk.jpg": _jpeg(img.convert("CMYK")),
        "grayscale.jpg": _jpeg(img.convert("L")),
        "progressive.jpg": _jpeg(img, progressive=True),
        "exif_rotated.jpg": with_exif_orientation(img),
        "one_pixel.jpg": _jpeg(img.resize((1, 1))),
        "huge.jpg": declare_size(raw, HUGE_SIDE, HUGE_SIDE),
        "garbled.jpg": bytes(garbled),
        "symlink_loop.jpg": None,
    }


def write_broken(folder: Path, photo: Path) -> list[Path]:
    """Write every kind into folder (prefixed zz_ so they sort last); returns the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, data in broken_files(photo).items():
        path = folder / f"zz_{name}"
        if data is None:
            os.symlink(path.name, path)  # points at itself: ELOOP on open
        else:
            path.write_bytes(data)
        paths.append(path)
    return paths


def broken_dataset(sample: Path, dest: Path, *, empty_class: bool = False, leak: bool = True) -> dict[str, list[Path]]:
    """A copy of sample (train/val/<class>) with every broken kind in train/daisy and val/roses,
    one train file duplicated into val (leakage) and, if asked, an empty class folder in both splits."""
    shutil.copytree(sample, dest)
    made = {
        "train": write_broken(dest / "train" / "daisy", next(iter(sorted((sample / "train" / "daisy").iterdir())))),
        "val": write_broken(dest / "val" / "roses", next(iter(sorted((sample / "val" / "roses").iterdir())))),
    }
    if leak:
        src = sorted((dest / "train" / "tulips").iterdir())[0]
        shutil.copyfile(src, dest / "val" / "tulips" / "zz_leaked_from_train.jpg")
        made["leak"] = [src, dest / "val" / "tulips" / "zz_leaked_from_train.jpg"]
    if empty_class:
        for split in ("train", "val"):
            (dest / split / "zz_empty").mkdir()
    return made
