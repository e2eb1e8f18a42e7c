"""Download TensorFlow's flower_photos archive, verify it, and write a stratified train/val split."""

from __future__ import annotations

import hashlib
import http.client
import json
import random
import shutil
import sys
import tarfile
import urllib.request
from pathlib import Path

from tqdm import tqdm

from .folder import IMAGE_SUFFIXES

FLOWERS_URL = "https://storage.googleapis.com/download.tensorflow.org/example_images/flower_photos.tgz"
# Pinned as TensorFlow Datasets records it for this URL (228,813,984 bytes).
FLOWERS_SHA256 = "4c54ace7911aaffe13a365c34f650e71dd5bf1be0a58b464e5a7183e3e595d9c"
COMPLETE = ".complete"


class FetchError(RuntimeError):
    """A download or archive problem, phrased as one line."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def download(url: str, target: Path, sha256: str, timeout: float = 60.0, progress: bool = True) -> None:
    """Stream `url` into target, hashing as it goes; only a verified file gets the final name."""
    part = target.with_name(target.name + ".part")
    digest = hashlib.sha256()
    received = 0
    try:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, open(part, "wb") as out:
                total = int(response.headers.get("Content-Length") or 0) or None
                with tqdm(total=total, unit="B", unit_scale=True, desc=target.name, disable=not progress) as bar:
                    while chunk := response.read(1 << 20):
                        out.write(chunk)
                        digest.update(chunk)
                        received += len(chunk)
                        bar.update(len(chunk))
        # URLError, HTTPError, timeouts and disk errors are OSErrors; a malformed URL is a ValueError;
        # a server that hangs up mid-response can raise an HTTPException.
        except (OSError, ValueError, http.client.HTTPException) as exc:
            raise FetchError(f"download of {url} failed: {exc}") from None
        # http.client ends the read quietly when the connection drops early; say so rather than
        # reporting it as a checksum mismatch.
        if total is not None and received != total:
            raise FetchError(
                f"download of {url} was cut short: got {received} of {total} bytes; the download was deleted"
            )
        if digest.hexdigest() != sha256.lower():
            raise FetchError(
                f"checksum mismatch for {url}: expected sha256 {sha256}, got {digest.hexdigest()}; the download was deleted"
            )
        part.replace(target)
    finally:
        # Also on Ctrl-C: a .part file is never a usable archive.
        part.unlink(missing_ok=True)


def stratified_split(
    files_by_class: dict[str, list[str]], val_fraction: float, seed: int
) -> dict[str, dict[str, list[str]]]:
    """Per class: sort the names, shuffle with a fixed seed, the first val_fraction go to val.

    Every class keeps at least one image in each split: the data loader rejects an empty class folder.
    """
    split: dict[str, dict[str, list[str]]] = {"train": {}, "val": {}}
    for name in sorted(files_by_class):
        files = sorted(files_by_class[name])
        if len(files) < 2:
            raise FetchError(
                f"class {name!r} has {len(files)} image(s); at least 2 are needed to put one in each of train and val"
            )
        random.Random(f"{seed}-{name}").shuffle(files)
        n_val = min(max(round(len(files) * val_fraction), 1), len(files) - 1)
        split["val"][name] = sorted(files[:n_val])
        split["train"][name] = sorted(files[n_val:])
    return split


def _extract(archive: Path, into: Path) -> Path:
    """Extract safely and return the folder that holds the class folders."""
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(into, filter="data")  # refuses absolute paths, '..' and links out of the folder
    except (tarfile.TarError, OSError) as exc:
        raise FetchError(f"cannot extract {archive}: {exc}") from None
    dirs = [p for p in into.iterdir() if p.is_dir()]
    return dirs[0] if len(dirs) == 1 else into


def _images_by_class(top: Path) -> dict[str, list[str]]:
    # Hidden entries are skipped: macOS archives carry '._name.jpg' resource forks that are not JPEGs.
    found = {
        d.name: [
            f.name
            for f in d.iterdir()
            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith(".")
        ]
        for d in sorted(top.iterdir())
        if d.is_dir() and not d.name.startswith(".")
    }
    return {k: v for k, v in found.items() if v}


def _refuse_foreign_splits(dest: Path, staging: Path) -> None:
    """Refuse a dest whose train/ or val/ this module did not write (they would be deleted below)."""
    # train/ and val/ are removed below as leftovers of an interrupted fetch; that is only safe when this
    # module made them. From the first rename on, .staging or split.json is there until .complete is.
    existing = [p for p in ("train", "val") if (dest / p).exists()]
    if existing and not (staging.exists() or (dest / "split.json").exists()):
        raise FetchError(
            f"{dest} already holds {' and '.join(existing)}/ that fetch did not write; choose a new or empty folder"
        )


def _verified_archive(dest: Path, url: str, sha256: str, progress: bool) -> Path:
    """The archive in dest, downloaded unless a verified copy is already there."""
    archive = dest / Path(url.split("?")[0]).name
    # An archive kept from an earlier fetch may come from another URL or checksum: reuse it only if it matches.
    if archive.is_file() and sha256_of(archive) != sha256.lower():
        archive.unlink()
    if not archive.is_file():
        download(url, archive, sha256, progress=progress)
    return archive


def _move_split(top: Path, staging: Path, split: dict[str, dict[str, list[str]]]) -> None:
    """Move each extracted image into staging/<train|val>/<class>/."""
    for part, classes in split.items():
        for name, files in classes.items():
            (staging / part / name).mkdir(parents=True)
            for f in files:
                (top / name / f).replace(staging / part / name / f)


def _remove_partial_split(dest: Path, staging: Path) -> None:
    """Delete whatever a failed split left behind (not the archive)."""
    for made in (staging, dest / "train", dest / "val", dest / "split.json"):
        if made.is_dir():
            shutil.rmtree(made, ignore_errors=True)
        else:
            made.unlink(missing_ok=True)


def _write_split(
    archive: Path, dest: Path, staging: Path, url: str, sha256: str, val_fraction: float, seed: int
) -> tuple[dict[str, dict[str, list[str]]], int]:
    """Extract, split and move into dest/train and dest/val, with split.json; returns the split and the class count."""
    try:
        top = _extract(archive, staging / "extracted")
        files_by_class = _images_by_class(top)
        if not files_by_class:
            raise FetchError(f"{archive} holds no class folders with images")
        split = stratified_split(files_by_class, val_fraction, seed)
        _move_split(top, staging, split)
        for part in split:
            (staging / part).replace(dest / part)
        (dest / "split.json").write_text(
            json.dumps(
                {"url": url, "sha256": sha256, "val_fraction": val_fraction, "seed": seed, "split": split}, indent=1
            )
        )
    except BaseException:
        # Leave no half-made split behind (the archive, verified, stays for the next attempt).
        _remove_partial_split(dest, staging)
        raise
    return split, len(files_by_class)


def fetch_flowers(
    dest: str | Path,
    url: str = FLOWERS_URL,
    sha256: str = FLOWERS_SHA256,
    val_fraction: float = 0.2,
    seed: int = 0,
    keep_archive: bool = False,
    progress: bool | None = None,
) -> Path:
    """Make dest/train and dest/val; a folder without the completion marker is treated as unfinished.

    progress: show a download bar; None = only when stderr is a terminal (a bar in a log file is noise).
    """
    dest = Path(dest)
    if (dest / COMPLETE).is_file():
        print(f"{dest} is already complete; delete it to fetch again")
        return dest
    if not 0 < val_fraction < 1:
        raise FetchError(f"val fraction must be in (0, 1), got {val_fraction}")
    if progress is None:
        progress = sys.stderr.isatty()
    staging = dest / ".staging"
    _refuse_foreign_splits(dest, staging)
    dest.mkdir(parents=True, exist_ok=True)
    archive = _verified_archive(dest, url, sha256, progress)
    shutil.rmtree(staging, ignore_errors=True)
    for leftover in ("train", "val"):  # from an earlier attempt that stopped before the marker
        shutil.rmtree(dest / leftover, ignore_errors=True)
    split, num_classes = _write_split(archive, dest, staging, url, sha256, val_fraction, seed)
    shutil.rmtree(staging)
    if not keep_archive:
        archive.unlink()
    (dest / COMPLETE).write_text(sha256 + "\n")
    counts = {part: sum(len(v) for v in classes.values()) for part, classes in split.items()}
    print(f"wrote {dest}: {counts['train']} train / {counts['val']} val images in {num_classes} classes")
    return dest
