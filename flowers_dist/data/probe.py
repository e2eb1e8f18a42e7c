"""Probe one image file: what it is, whether it decodes, and what each loader's decoder does with it.

The probe decodes with PIL (at reduced scale for JPEGs: the whole entropy-coded stream is
still read, so truncation and broken streams show up). PIL is the stricter of the two
decoders on every kind tried (see DECODERS): a file PIL decodes in full, within the size
limits, is one DALI's CPU decoder decodes to the same pixels. Needs no torch.
"""

from __future__ import annotations

import hashlib
import io
import re
import warnings
from dataclasses import asdict, dataclass

from PIL import Image, UnidentifiedImageError

# Kinds that keep a file out of training (the loaders never see it).
SKIPPED = (
    "unreadable",
    "zero_bytes",
    "truncated",
    "not_image",
    "too_large",
    "too_small",
    "duplicate",
    "leak",
    "outside_class_folders",
)
# Kinds of readable files that both decoders handle; reported, kept.
NOTES = ("not_jpeg", "cmyk", "grayscale", "progressive", "exif_orientation")

# What each decoder does with each kind, as run here (PIL 12 via load_rgb; DALI 2.4's CPU
# fn.decoders.image with output_type RGB); tests/test_check.py::test_decoders_do_what_the_table_says
# runs DALI on the kept kinds again.
DECODERS = {
    "unreadable": "PIL: cannot identify it or 'broken data stream'; DALI: fails the batch (garbled header), or "
    "silently decodes damaged pixels (garbled scan data); a symlink loop: ELOOP on open",
    "zero_bytes": "PIL: cannot identify image file; DALI: 'File mapping failed', the batch fails",
    "truncated": "PIL: 'image file is truncated'; DALI: 'Premature end of JPEG data', the batch fails",
    "not_image": "PIL: cannot identify image file; DALI: nvImageCodec failure, the batch fails",
    "too_large": "PIL: DecompressionBombError above 178,956,970 pixels, a warning above 89,478,485; DALI: "
    "libjpeg-turbo refuses, then a fallback decoder allocates the full image (1.2 GB of grey for 20000x20000)",
    "too_small": "PIL and DALI: decode it (a 1x1 image is upscaled to a flat colour)",
    "duplicate": "both decode it; training keeps the first copy in the split",
    "leak": "both decode it; training keeps the train copy and leaves the val copy out of evaluation",
    "outside_class_folders": "neither loader reads it: an image's label is the name of the class folder it is in",
    "not_jpeg": "PNG: PIL and DALI both decode by content, whatever the name: identical pixels",
    "cmyk": "PIL and DALI both convert to RGB: identical pixels",
    "grayscale": "PIL and DALI both replicate the channel to RGB: identical pixels",
    "progressive": "PIL and DALI both decode it: identical pixels",
    "exif_orientation": "PIL (exif_transpose in load_rgb) and DALI both rotate it upright: identical pixels",
}

# Formats both loaders read (by content, not by name).
DECODABLE = ("JPEG", "PNG")
_PIL_DECOMPRESSION_LIMIT = 2 * 89_478_485  # PIL raises DecompressionBombError above this, whatever we allow


@dataclass(frozen=True)
class Probe:
    """One file's verdict; kind is 'ok', a SKIPPED kind, or the first of its NOTES."""

    path: str
    kind: str
    detail: str = ""
    width: int = 0
    height: int = 0
    notes: tuple[str, ...] = ()
    digest: str = ""
    bytes: int = 0

    @property
    def skipped(self) -> bool:
        return self.kind in SKIPPED

    def to_dict(self) -> dict:
        return {**asdict(self), "notes": list(self.notes), "skipped": self.skipped}

    @classmethod
    def from_dict(cls, d: dict) -> Probe:
        return cls(**{k: (tuple(v) if k == "notes" else v) for k, v in d.items() if k != "skipped"})


def sniff(head: bytes) -> str:
    """What the first bytes say the file is, whatever its name."""
    if head.startswith(b"\xff\xd8"):  # SOI; what follows may be damaged
        return "JPEG"
    signatures = {
        b"\x89PNG\r\n\x1a\n": "PNG",
        b"GIF8": "GIF",
        b"BM": "BMP",
        b"II*\x00": "TIFF",
        b"MM\x00*": "TIFF",
        b"%PDF": "PDF",
        b"PK\x03\x04": "ZIP archive",
        b"\x1f\x8b": "gzip data",
    }
    for sig, name in signatures.items():
        if head.startswith(sig):
            return name
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    if head[8:12] in (b"ftyp",) or head[4:8] == b"ftyp":
        return "HEIF/MP4"
    stripped = head.lstrip().lower()
    if stripped.startswith((b"<!doctype html", b"<html")):
        return "HTML"
    if stripped.startswith(b"<"):
        return "XML/HTML"
    try:
        text = head.decode("utf-8")
        if text and all(c.isprintable() or c in "\r\n\t" for c in text):
            return "text"
    except UnicodeDecodeError:
        pass
    return "unknown binary data"


def _open(path: str, data: bytes, what: str, common: dict) -> Image.Image | Probe:
    """PIL's lazy open (header only), or the verdict on a file whose header PIL refuses."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size limit is ours, below
            return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:  # raised from the header alone, before any pixel is decoded
        pixels = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{int(pixels.group(1)):,} pixels" if pixels else "too many pixels"
        return Probe(path, "too_large", f"{size}, over PIL's decompression-bomb limit", **common)
    except UnidentifiedImageError:
        return Probe(path, "unreadable", f"{what} signature, but PIL cannot identify the image", **common)
    except (OSError, SyntaxError, ValueError) as exc:
        return Probe(path, "unreadable", f"{what} signature, but PIL: {exc}", **common)


def _notes(img: Image.Image, what: str) -> list[tuple[str, str]]:
    """The NOTES kinds that apply to an opened image, each with its detail, in NOTES order."""
    notes = []
    if what != "JPEG" or img.format != "JPEG":
        notes.append(("not_jpeg", f"{what} data"))
    if img.mode == "CMYK":
        notes.append(("cmyk", "CMYK"))
    elif img.mode in ("L", "LA", "1", "I", "I;16", "F"):
        notes.append(("grayscale", f"mode {img.mode}"))
    if img.info.get("progressive") or img.info.get("progression"):
        notes.append(("progressive", "progressive JPEG"))
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block is PIL's problem at decode, reported there
        orientation = 1
    if orientation not in (0, 1):
        notes.append(("exif_orientation", f"EXIF orientation {orientation}"))
    return notes


def _decode_failure(img: Image.Image) -> tuple[str, str] | None:
    """Decode the whole stream; (kind, detail) when it fails, None when it decodes."""
    w, h = img.size
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if img.format == "JPEG":
                img.draft("RGB", (max(1, w // 8), max(1, h // 8)))  # DCT scaling: 1/8 the work, same stream read
            img.load()
    except OSError as exc:
        return ("truncated" if "truncated" in str(exc) else "unreadable"), f"PIL: {exc}"
    except (SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        return "unreadable", f"PIL: {exc}"
    return None


def probe(path: str, max_pixels: int, min_side: int) -> Probe:
    """Classify one file (never raises for a bad file)."""
    try:
        with open(path, "rb") as fh:  # follows symlinks: a loop fails here with ELOOP
            data = fh.read()
    except OSError as exc:
        return Probe(path, "unreadable", exc.strerror or str(exc))
    return probe_bytes(path, data, max_pixels, min_side)


def probe_bytes(path: str, data: bytes, max_pixels: int, min_side: int) -> Probe:
    """Classify an image's bytes, named `path` in the verdict (a pack's sample: `<shard>:<key>`)."""
    common = dict(digest=hashlib.sha256(data).hexdigest(), bytes=len(data))
    if not data:
        return Probe(path, "zero_bytes", "the file is empty", **common)
    what = sniff(data[:64])
    if what not in DECODABLE:
        image_like = what in ("GIF", "BMP", "TIFF", "WebP", "HEIF/MP4")
        why = "an image format the loaders are not checked on" if image_like else "not an image"
        return Probe(path, "not_image", f"{what} ({why})", **common)
    img = _open(path, data, what, common)
    if isinstance(img, Probe):
        return img
    w, h = img.size
    common.update(width=w, height=h)
    if w * h > max_pixels:
        return Probe(path, "too_large", f"{w}x{h} = {w * h:,} pixels, over data.max_pixels={max_pixels:,}", **common)
    if min(w, h) < min_side:
        return Probe(path, "too_small", f"{w}x{h}, a side under data.min_side={min_side}", **common)
    notes = _notes(img, what)
    failure = _decode_failure(img)
    if failure is not None:
        return Probe(path, *failure, notes=tuple(n for n, _ in notes), **common)
    if notes:
        return Probe(path, notes[0][0], "; ".join(d for _, d in notes), notes=tuple(n for n, _ in notes), **common)
    return Probe(path, "ok", **common)


def probe_many(args: tuple[list[str], int, int]) -> list[Probe]:
    """A chunk of probes, for a process pool (one task per chunk keeps the pickling small)."""
    paths, max_pixels, min_side = args
    return [probe(p, max_pixels, min_side) for p in paths]
