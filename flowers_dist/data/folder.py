"""Find the classes and image files of a data-set split laid out as <split>/<class>/<image>."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import DataError

if TYPE_CHECKING:
    from .shards import Sample

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


@dataclass(frozen=True)
class Split:
    """The files of one split, in a fixed order, with labels indexing `classes`."""

    root: Path
    classes: tuple[str, ...]
    files: tuple[Path, ...]
    labels: tuple[int, ...]
    outside: tuple[Path, ...] = ()
    """Images directly in the split folder, outside every class folder: no label, so no loader reads them."""
    members: tuple[Sample, ...] = ()
    """A packed split (shards.split): sample i lies in a shard at members[i]; files[i] is then only its name."""

    def __len__(self) -> int:
        return len(self.files)

    @property
    def packed(self) -> bool:
        return bool(self.members)

    def name(self, i: int) -> str:
        """What identifies sample i in records: its key in a pack, else its path relative to the split folder."""
        if self.members:
            return self.members[i].key
        return self.files[i].relative_to(self.root).as_posix()


def list_classes(split_dir: Path) -> list[str]:
    if not split_dir.is_dir():
        raise DataError(f"data folder {split_dir} does not exist")
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"data folder {split_dir} has no class sub-folders (expected {split_dir}/<class>/<image>.jpg)")
    return classes


def images_outside_classes(split_dir: Path) -> list[Path]:
    """Image files put directly in a split folder (train/x.jpg): they belong to no class."""
    return sorted(p for p in split_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir())


def scan_split(split_dir: str | Path, classes: list[str] | tuple[str, ...] | None = None) -> Split:
    """Scan one split; with `classes` given, the folder must hold exactly those classes."""
    split_dir = Path(split_dir)
    found = list_classes(split_dir)
    if classes is not None and list(classes) != found:
        missing = sorted(set(classes) - set(found))
        extra = sorted(set(found) - set(classes))
        raise DataError(
            f"class folders of {split_dir} differ from the expected classes (missing: {missing or 'none'}, unexpected: {extra or 'none'})"
        )
    files: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(found):
        images = sorted(p for p in (split_dir / name).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise DataError(f"class folder {split_dir / name} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        files.extend(images)
        labels.extend([label] * len(images))
    return Split(split_dir, tuple(found), tuple(files), tuple(labels), tuple(images_outside_classes(split_dir)))


def scan_dataset(root: str | Path) -> tuple[Split, Split]:
    """Scan root/train and root/val; both must hold the same sorted class list."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data root {root} does not exist (set data.root, or run `flowers-dist data fetch {root}`)")
    train = scan_split(root / "train")
    val = scan_split(root / "val", train.classes)
    return train, val


def resolve_eval_dir(path: str | Path) -> Path:
    """Accept either a data-set root (its val/ is used) or a folder of class folders."""
    path = Path(path)
    return path / "val" if (path / "val").is_dir() else path
