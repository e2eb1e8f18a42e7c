"""The PyTorch loader: PIL decode and torchvision augmentation in worker processes.

The baseline and fallback behind the loader contract: workers return uint8 tensors,
normalisation happens on the device, and on CUDA the next batch is copied on a side
stream while the current one computes.
"""

from __future__ import annotations

import io
import logging
import signal
import warnings
from collections.abc import Callable, Iterator
from functools import partial

import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from ..config import DataConfig
from .contract import DeviceNormalizer, Placement, eval_shard, sample_seed, train_shard
from .folder import Split
from .resolution import at_epoch, train_size
from .shards import SampleReader

log = logging.getLogger(__name__)


def train_transform(cfg: DataConfig) -> Callable:
    steps = [
        v2.RandomResizedCrop(cfg.image_size, scale=cfg.scale, ratio=cfg.ratio, antialias=True),
        v2.RandomHorizontalFlip(cfg.hflip),
    ]
    if cfg.rotation > 0:
        steps.append(v2.RandomRotation(cfg.rotation))
    if cfg.color_jitter > 0:
        steps.append(
            v2.ColorJitter(brightness=cfg.color_jitter, contrast=cfg.color_jitter, saturation=cfg.color_jitter)
        )
    steps.append(v2.PILToTensor())
    return v2.Compose(steps)


class EpochTransform:
    """The training transform of each epoch: crops of data.image_size, or of progressive resizing's side
    (resolution.train_size), one transform kept per side."""

    def __init__(self, cfg: DataConfig):
        self.cfg, self.made = cfg, {}

    def __call__(self, epoch: int) -> Callable:
        size = train_size(self.cfg, epoch)
        if size not in self.made:
            self.made[size] = train_transform(at_epoch(self.cfg, epoch))
        return self.made[size]


def eval_transform(cfg: DataConfig) -> Callable:
    return v2.Compose([v2.Resize(cfg.eval_resize, antialias=True), v2.CenterCrop(cfg.image_size), v2.PILToTensor()])


class UnreadableImage(OSError):
    """A file load_rgb refuses, with the reason (an OSError, so every caller's skip path catches it)."""


def load_rgb(path, max_pixels: int = DataConfig.max_pixels) -> Image.Image:
    """Decode to RGB, refusing images over max_pixels from the header, before their pixels are allocated."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the limit applied is max_pixels
            with Image.open(path) as img:
                w, h = img.size
                if w * h > max_pixels:
                    raise UnreadableImage(f"{w}x{h} = {w * h:,} pixels, over data.max_pixels={max_pixels:,}")
                # Honour the EXIF orientation tag, as DALI's decoder does, so both loaders see the same pixels.
                return ImageOps.exif_transpose(img).convert("RGB")
    except Image.DecompressionBombError as exc:  # over PIL's own hard limit: refused at open
        raise UnreadableImage(str(exc).split(", could be")[0]) from None


class ImageFiles(Dataset):
    """Indexed by (file index, epoch) so augmentation is a pure function of seed, epoch and file.

    A packed split's samples are read by offset from their shards (kept open, per worker) and
    decoded from the bytes: the same pixels as from the file they were packed from."""

    def __init__(
        self, split: Split, transform: Callable | EpochTransform, seed: int, max_pixels: int = DataConfig.max_pixels
    ):
        self.split, self.transform, self.seed, self.max_pixels = split, transform, seed, max_pixels
        self.reader = SampleReader()

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key: tuple[int, int]):
        index, epoch = key
        path = self.split.files[index]
        try:
            source = io.BytesIO(self.reader.read(self.split.members[index])) if self.split.packed else path
            image = load_rgb(source, self.max_pixels)
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
            if self.split.packed:  # the shard, not the name of a file that is not on disk
                member = self.split.members[index]
                log.warning("skipping unreadable sample %s in %s: %s", member.key, member.shard, exc)
            else:
                log.warning("skipping unreadable image %s: %s", path, exc)
            return None
        # fork_rng keeps the worker's global generator untouched; the seed alone decides.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, epoch, index))
            transform = self.transform(epoch) if isinstance(self.transform, EpochTransform) else self.transform
            return transform(image), self.split.labels[index]


def collate_skipping(items, size: int):
    """Stack uint8 images; files that failed to decode were already logged and are left out.

    A batch with none left is (0, 3, size, size), not (0, 3, 0, 0): the model runs on it (every
    layer accepts an empty batch of the right shape), so a training rank with nothing to learn
    from in a step still joins DDP's gradient all-reduce instead of crashing in a pooling layer.
    (Under progressive resizing `size` is data.image_size, not the epoch's side: any side the
    model accepts gives the same empty output.)
    """
    items = [item for item in items if item is not None]
    if not items:
        return torch.empty(0, 3, size, size, dtype=torch.uint8), torch.empty(0, dtype=torch.int64)
    images, labels = zip(*items)
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64)


class _EpochBatches:
    """Batch sampler whose batches come from a pure function of the epoch; `length` batches every epoch."""

    def __init__(self, make: Callable[[int], list[list[int]]], length: int):
        self.make, self.epoch, self.skip, self.length = make, 0, 0, length

    def __iter__(self):
        for batch in self.make(self.epoch)[self.skip :]:
            yield [(i, self.epoch) for i in batch]

    def __len__(self) -> int:
        # Counted, not made: the loop asks every step, and making the epoch shuffles every file.
        return self.length


def _ignore_stop_signals(worker_id: int) -> None:
    # SLURM signals every process of a job step, workers included; a worker killed by SIGUSR1 or
    # SIGTERM (their default action) would crash the loader while the main process checkpoints.
    # The main process ends its workers itself.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class TorchLoader:
    """DataLoader over one split, sharded by global rank, yielding the loader contract."""

    kind = "torch"

    def __init__(
        self,
        dataset: ImageFiles,
        batches: _EpochBatches,
        normalize: DeviceNormalizer,
        placement: Placement,
        image_size: int,
    ):
        self.batches = batches
        self.split = dataset.split
        self.names = dataset.split.name
        self.yielded = 0  # micro-batches handed out since set_epoch
        self.normalize = normalize
        self.device = placement.device
        self.num_samples = sum(len(b) for b in batches.make(0))
        workers = placement.workers
        self.loader = DataLoader(
            dataset,
            batch_sampler=batches,
            num_workers=workers,
            collate_fn=partial(collate_skipping, size=image_size),
            worker_init_fn=_ignore_stop_signals,
            pin_memory=self.device.type == "cuda",
            persistent_workers=workers > 0,
            prefetch_factor=4 if workers > 0 else None,
        )

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.batches.epoch, self.batches.skip = epoch, skip
        self.yielded = 0

    def resume_state(self) -> None:
        return None  # order and augmentation are pure functions of (seed, epoch, file); the loop knows the step

    def trained(self) -> list[str]:
        b = self.batches
        return [self.names(i) for batch in b.make(b.epoch)[b.skip : b.skip + self.yielded] for i in batch]

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.device.type != "cuda":
            for images, labels in self.loader:
                self.yielded += 1
                yield self.normalize(images, labels)
            return
        # Copy and normalise batch k+1 on a side stream while the model computes batch k.
        stream = torch.cuda.Stream(self.device)
        pending = None
        for images, labels in self.loader:
            with torch.cuda.stream(stream):
                ready = self.normalize(images, labels)
            if pending is not None:
                self.yielded += 1
                yield pending
            torch.cuda.current_stream(self.device).wait_stream(stream)
            for t in ready:
                t.record_stream(torch.cuda.current_stream(self.device))
            pending = ready
        if pending is not None:
            self.yielded += 1
            yield pending


def build_torch_loader(
    cfg: DataConfig,
    split: Split,
    train: bool,
    batch_size: int,
    placement: Placement,
    seed: int,
    max_steps: int = 0,
    accum: int = 1,
) -> TorchLoader:
    p = placement
    if train:

        def make(epoch: int) -> list[list[int]]:
            batches = train_shard(len(split), batch_size, p.rank, p.world_size, seed, epoch, accum)
            return batches[:max_steps] if max_steps else batches

        length = len(split) // (batch_size * p.world_size * accum) * accum  # train_shard's micro-batches
        length = min(length, max_steps) if max_steps else length
        transform = EpochTransform(cfg)
    else:

        def make(epoch: int) -> list[list[int]]:
            return eval_shard(len(split), batch_size, p.rank, p.world_size)

        mine = len(range(p.rank, len(split), p.world_size))  # eval_shard's files of this rank
        length = -(-mine // batch_size)
        transform = eval_transform(cfg)
    # Each file's augmentation depends on (seed, epoch, file), not on the rank that reads it.
    dataset = ImageFiles(split, transform, seed, cfg.max_pixels)
    return TorchLoader(dataset, _EpochBatches(make, length), DeviceNormalizer(cfg.mean, cfg.std, p), p, cfg.image_size)
