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
from typing import Protocol, TypedDict

import torch

from .folder import Split


class BatchLoader(Protocol):
    num_samples: int
    """Samples this process sees per epoch (before any corrupt file is skipped)."""
    kind: str
    """Which loader this is ("torch", "dali"): what data.loader=auto chose, for the run's record."""
    split: Split
    """The split it reads (a folder's files or a pack's samples), for a pass of its own (mistakes.py)."""

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """The next iteration yields epoch `epoch` from its batch `skip` on (`len()` - skip batches)."""
        ...

    def resume_state(self) -> ReaderState | None:
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


def epoch_order(num_files: int, seed: int, epoch: int) -> list[int]:
    """The epoch's permutation of all files, seeded by (seed, epoch): the same on every rank and at any world size."""
    order = list(range(num_files))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


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
    return _deal(epoch_order(num_files, seed, epoch), batch_size, rank, world_size, accum)


def rest_of_epoch(
    names: list[str],
    trained: set[str],
    steps_left: int,
    batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    epoch: int,
    accum: int = 1,
) -> list[list[int]]:
    """This rank's micro-batches for the last `steps_left` optimizer steps of an epoch of which `trained` is done.

    For a mid-epoch resume that has no reader position to continue from (DALI's reader state is
    per rank, so it is lost when the world size changes): the files not yet trained, in the
    epoch's global order (`epoch_order`), dealt into global batches as `train_shard` deals them,
    so every rank of any world size agrees, nothing trained before the stop is trained again,
    and nothing is trained twice. `names` are the split's names (Split.name) by index.
    """
    if len(names) - len(trained) < steps_left * batch_size * world_size * accum:
        raise ValueError(
            f"{len(trained)} of {len(names)} samples trained leave fewer than {steps_left} optimizer steps' worth"
        )
    rest = [i for i in epoch_order(len(names), seed, epoch) if names[i] not in trained]
    return _deal(rest, batch_size, rank, world_size, accum)[: steps_left * accum]


def _deal(order: list[int], batch_size: int, rank: int, world_size: int, accum: int) -> list[list[int]]:
    slices = world_size * accum
    global_batch = batch_size * slices
    batches = []
    for start in range(0, len(order) - global_batch + 1, global_batch):
        for micro in range(accum):
            batches.append(order[start + micro * world_size + rank : start + global_batch : slices])
    return batches


class ReaderState(TypedDict):
    """What a loader with a per-rank reader position saves for a mid-epoch resume (`resume_state()`).

    `reader` continues this rank exactly (DALI's checkpoint of reader and random generators),
    at the same world size only; `trained` names the samples of the unfinished epoch this rank
    has trained (with those carried over from an earlier resume), so that a resume at another
    world size can train exactly the rest of the epoch (`rest_of_epoch`).
    """

    reader: str | None
    trained: list[str]


def carried_state(states: list, saved_world: int, world: int, rank: int) -> ReaderState | str | None:
    """This rank's loader state for a mid-epoch resume from the saved ranks' `states`.

    The same world size with every rank's reader: this rank's own state. Otherwise (another world
    size, or a run saved while it was training such a rest) no reader: the union of what every
    saved rank trained, for `rest_of_epoch`. None where the states say nothing (a loader whose
    order is a function of the epoch) or are of an older format that named no samples.
    """
    if saved_world == world and len(states) == world and all(_has_reader(s) for s in states):
        return states[rank]
    if not states or not all(isinstance(s, dict) for s in states):
        return None
    trained = sorted({name for s in states for name in s["trained"]})
    return ReaderState(reader=None, trained=trained)


def _has_reader(state) -> bool:
    return isinstance(state, str) or (isinstance(state, dict) and state.get("reader") is not None)


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
