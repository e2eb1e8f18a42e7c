"""The val images a model gets wrong: one prediction per val sample, the most confident mistakes first, as a page, a grid and a table.

The predictions come from one pass over the val split on the main process with the PyTorch
loader's eval transform (resize, centre crop), whichever loader trained: DALI's val pipeline does
not name its samples, and the val split is small (736 flowers), so one more read of it is cheap
next to a training run. The pixels are therefore PIL's, which can move a borderline prediction
against DALI's epoch evaluation; the counts in metrics.jsonl stay the exact ones.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, Dataset

from .config import Config, DataConfig
from .data.contract import DeviceNormalizer, Placement
from .data.folder import Split
from .data.shards import read_sample
from .data.torch_loader import ImageFiles, eval_transform, load_rgb
from .distributed import placement
from .sinks import Media, Picture, Table

THUMBNAIL_PX = 100  # the longer side of a thumbnail: the page and the table stay small
GRID = 16  # images in mistakes.png (4 x 4)
COLUMNS = ("image", "true", "predicted", "confidence", "true_prob", "file")


@dataclass(frozen=True)
class Prediction:
    """The model's answer for one val sample."""

    index: int
    """The sample's index in the split."""
    file: str
    """What a person finds it by: its path under the split folder, or in a pack the file it was packed from."""
    true: int
    predicted: int
    confidence: float
    """Softmax probability of the predicted class."""
    true_prob: float
    """Softmax probability of the true class."""

    @property
    def wrong(self) -> bool:
        return self.true != self.predicted


def worst(predictions: Sequence[Prediction], limit: int) -> list[Prediction]:
    """The wrong predictions, the most confident first (ties by file, so the order is stable), at most `limit`."""
    wrong = sorted((p for p in predictions if p.wrong), key=lambda p: (-p.confidence, p.file))
    return wrong[: max(limit, 0)]


def file_of(split: Split, index: int) -> str:
    """A sample as a person finds it: the file a pack's sample was packed from, else its path under the split."""
    if split.packed:
        return split.members[index].source or split.name(index)
    return split.name(index)


class _Indexed(Dataset):
    """The eval-transformed sample with its index, or None for one that does not decode (left out, as the loaders do)."""

    def __init__(self, files: ImageFiles):
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        item = self.files[(index, 0)]
        return None if item is None else (*item, index)


def _collate(items):
    items = [item for item in items if item is not None]
    if not items:
        return None
    images, labels, indices = zip(*items)
    return torch.stack(images), torch.tensor(labels), list(indices)


@torch.no_grad()
def predict_split(
    model: torch.nn.Module,
    split: Split,
    cfg: DataConfig,
    placement: Placement,
    batch_size: int,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
) -> list[Prediction]:
    """One prediction per sample of `split` (folder or pack) that decodes, in split order, on this process alone."""
    model.eval()
    normalize = DeviceNormalizer(cfg.mean, cfg.std, placement)
    loader = DataLoader(
        _Indexed(ImageFiles(split, eval_transform(cfg), seed=0, max_pixels=cfg.max_pixels)),
        batch_size=batch_size,
        num_workers=placement.workers,
        collate_fn=_collate,
    )
    out: list[Prediction] = []
    for batch in loader:
        if batch is None:
            continue
        images, labels, indices = batch
        images, labels = normalize(images, labels)
        with autocast():
            probs = model(images).float().softmax(1)
        conf, pred = probs.max(1)
        true_prob = probs.gather(1, labels.view(-1, 1)).view(-1)
        for i, t, p, c, q in zip(indices, labels.tolist(), pred.tolist(), conf.tolist(), true_prob.tolist()):
            out.append(Prediction(i, file_of(split, i), t, p, c, q))
    return out


def thumbnail(split: Split, index: int, size: int = THUMBNAIL_PX) -> bytes:
    """A JPEG of the sample at most `size` px a side, from its file or, in a pack, from its bytes in the shard."""
    source = io.BytesIO(read_sample(split.members[index])) if split.packed else split.files[index]
    image = load_rgb(source)
    image.thumbnail((size, size))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def write_html(
    path: Path, mistakes: Sequence[Prediction], thumbs: Sequence[bytes], classes: Sequence[str], total: int
) -> Path:
    """A page that needs nothing beside it: each mistake's thumbnail inline (base64 JPEG), classes, confidence, file."""
    wrong = f"{len(mistakes)} most confident mistakes" if mistakes else "no mistakes"
    rows = [
        f"<tr><td><img src='data:image/jpeg;base64,{base64.b64encode(t).decode()}' alt=''></td>"
        f"<td>{html.escape(classes[p.true])}</td><td>{html.escape(classes[p.predicted])}</td>"
        f"<td>{p.confidence:.3f}</td><td>{p.true_prob:.3f}</td><td>{html.escape(p.file)}</td></tr>"
        for p, t in zip(mistakes, thumbs)
    ]
    path.write_text(
        "<!doctype html>\n<html><head><meta charset='utf-8'><title>val mistakes</title>\n"
        "<style>body{font-family:sans-serif}td,th{padding:2px 8px;text-align:left}img{max-height:100px}</style>"
        f"</head><body>\n<h1>val mistakes</h1>\n<p>{total} val images predicted; {wrong}, most confident first.</p>\n"
        "<table>\n<tr><th>image</th><th>true</th><th>predicted</th><th>confidence</th><th>p(true)</th><th>file</th></tr>\n"
        + "\n".join(rows)
        + "\n</table>\n</body></html>\n"
    )
    return path


def write_grid(path: Path, mistakes: Sequence[Prediction], thumbs: Sequence[bytes], classes: Sequence[str]) -> Path:
    """The worst GRID mistakes as one PNG, 4 a row, each captioned with its true and predicted class and the confidence.

    Drawn with PIL, not matplotlib as the report's plots are: it is written at the end of every run, and
    matplotlib's import and layout cost a second or two where PIL takes milliseconds.
    """
    from PIL import Image, ImageDraw, ImageFont

    shown = list(zip(mistakes, thumbs))[:GRID]
    cols, cell, caption = 4, THUMBNAIL_PX + 20, 34
    rows = max(1, -(-len(shown) // cols))
    canvas = Image.new("RGB", (cols * cell, 24 + rows * (cell + caption)), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=11)
    draw.text((6, 4), "val mistakes, most confident first" if shown else "no val mistakes", fill="black", font=font)
    for k, (p, t) in enumerate(shown):
        x, y = (k % cols) * cell, 24 + (k // cols) * (cell + caption)
        draw.text((x + 4, y), f"true {classes[p.true]}", fill="black", font=font)
        draw.text((x + 4, y + 14), f"pred {classes[p.predicted]} {p.confidence:.2f}", fill="firebrick", font=font)
        with Image.open(io.BytesIO(t)) as image:
            canvas.paste(image, (x + (cell - image.width) // 2, y + caption))
    canvas.save(path, format="PNG", optimize=True)
    return path


def table(mistakes: Sequence[Prediction], thumbs: Sequence[bytes], classes: Sequence[str]) -> Table:
    """The mistakes as a tracker's table: COLUMNS, one row each, the thumbnail as a Picture."""
    return Table(
        COLUMNS,
        tuple(
            (Picture(t, p.file), classes[p.true], classes[p.predicted], p.confidence, p.true_prob, p.file)
            for p, t in zip(mistakes, thumbs)
        ),
    )


def publish(out: Path, predictions: Sequence[Prediction], split: Split, limit: int) -> Media:
    """Write out/mistakes.html and out/mistakes.png; return the table (`val/mistakes`) and a line for the console."""
    out.mkdir(parents=True, exist_ok=True)
    classes = split.classes
    mistakes = worst(predictions, limit)
    thumbs = [thumbnail(split, p.index) for p in mistakes]
    write_html(out / "mistakes.html", mistakes, thumbs, classes, len(predictions))
    write_grid(out / "mistakes.png", mistakes, thumbs, classes)
    wrong = sum(p.wrong for p in predictions)
    line = f"val mistakes: {wrong} of {len(predictions)} wrong; the {len(mistakes)} most confident in {out / 'mistakes.html'}"
    return Media(tables={"val/mistakes": table(mistakes, thumbs, classes)}, notes=(line,))


def of_model(
    model: torch.nn.Module,
    split: Split,
    cfg: DataConfig,
    place: Placement,
    *,
    batch_size: int,
    out: Path,
    limit: int,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
) -> Media:
    """The `limit` worst val mistakes of `model`, predicted on this process alone (the main one), written to `out`."""
    if limit == 0:
        return Media()
    place = dataclasses.replace(place, rank=0, world_size=1)  # the whole split here, whatever the world
    return publish(out, predict_split(model, split, cfg, place, batch_size, autocast), split, limit)


def of_run(
    cfg: Config, run_dir: Path, model: torch.nn.Module, split: Split, accelerator: Accelerator, plots: bool
) -> Media:
    """End of training, on the main process: the val mistakes of the final weights into RUN_DIR/report/, and for
    the trackers `val/mistakes` and, with `plots` (a tracker shows them), the report's plots as `report/<plot>`.

    Without a tracker the plots wait for `flowers-dist report`: matplotlib costs a second or two a run."""
    media = Media()
    if plots:
        from .report import write_plots

        media = Media(images={f"report/{p.stem}": Picture(p.read_bytes(), p.stem) for p in write_plots(run_dir)})
    place = placement(accelerator, channels_last=cfg.model.channels_last, workers=cfg.data.num_workers)
    mistakes = of_model(
        model,
        split,
        cfg.data,
        place,
        batch_size=cfg.train.eval_batch_size,
        out=Path(run_dir) / "report",
        limit=cfg.tracking.mistakes,
        autocast=accelerator.autocast,
    )
    return media | mistakes
