"""The one loader contract the training loop relies on, and the sharding rules every loader follows.

Every loader yields `(images, labels)`: images already on the target device, normalised,
float (or the requested low-precision dtype), NCHW or channels_last; labels int64 on the
same device. `len(loader)` is the number of batches this process yields per epoch, and
`set_epoch(e, skip)` picks that epoch's order and augmentation and where in it the next
iteration starts (a run resumed mid-epoch). The loop never asks which loader it has.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch


class BatchLoader(Protocol):
    num_samples: int
    """Samples this process sees per epoch (before any corrupt file is skipped)."""
    kind: str
    """Which loader this is ("torch", "dali"): what data.loader=auto chose, for the run's record."""

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """The next iteration yields epoch `epoch` from its batch `skip` on (`len()` - skip batches)."""
        ...

    def resume_state(self) -> str | None:
        """This rank's state where the consumer stands (an epoch boundary or mid-epoch), to rebuild the loader exactly there on resume.

        None when the loader needs none: its order and augmentation are functions of the epoch.
        """
        ...

    def trained(self) -> list[str]:
        """The samples of the micro-batches handed out since `set_epoch`, by `Split.name` (train.record_samples)."""
        ...

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


@dataclass(frozen=True)
class Placement:
    """Where and how batches must arrive: plain values, no distributed objects."""

    rank: int
    world_size: int
    device: torch.device
    dtype: torch.dtype = torch.float32
    channels_last: bool = False
    workers: int = 0


def train_shard(
    num_files: int, batch_size: int, rank: int, world_size: int, seed: int, epoch: int, accum: int = 1
) -> list[list[int]]:
    """This rank's training (micro-)batches for one epoch, `accum` per optimizer step.

    One permutation of all files, seeded by (seed, epoch) and therefore the same on every
    rank, is cut into full global batches of batch_size x world_size x accum files; the
    tail that does not fill one is dropped so every rank runs the same number of steps (a rank
    with fewer would hang the all-reduce). Each global batch is dealt into world_size x accum
    slices, every (world_size x accum)-th file; rank r's micro-batch j is slice j x world_size + r.
    So a global batch holds the same files at any world size, and its slices, the groups
    BatchNorm normalises over without sync_bn, are the same whenever world_size x accum is.
    """
    order = list(range(num_files))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    slices = world_size * accum
    global_batch = batch_size * slices
    batches = []
    for start in range(0, num_files - global_batch + 1, global_batch):
        for micro in range(accum):
            batches.append(order[start + micro * world_size + rank : start + global_batch : slices])
    return batches


def eval_shard(num_files: int, batch_size: int, rank: int, world_size: int) -> list[list[int]]:
    """This rank's evaluation batches: every file exactly once over all ranks, no padding.

    Ranks may get different numbers of batches; evaluation must therefore run no collective
    inside its loop and sum counts once at the end.
    """
    mine = list(range(rank, num_files, world_size))
    return [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """Augmentation seed of one file in one epoch: independent of ranks, workers and resumes."""
    return ((seed * 1_000_003 + epoch) * 1_000_003 + index) % (2**63)


class DeviceNormalizer:
    """uint8 NCHW batches -> normalised float batches on the device (as timm's prefetch loader does).

    Normalising after the copy moves 4x fewer bytes over PCIe and keeps the host free.
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], placement: Placement):
        self.placement = placement
        shape = (1, len(mean), 1, 1)
        self.mean = torch.tensor([m * 255 for m in mean], device=placement.device).view(shape)
        self.std = torch.tensor([s * 255 for s in std], device=placement.device).view(shape)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.placement
        images = images.to(p.device, non_blocking=True)
        labels = labels.to(p.device, non_blocking=True)
        images = images.float().sub_(self.mean).div_(self.std)
        if p.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images.to(p.dtype), labels
