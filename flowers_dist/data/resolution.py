"""Progressive resizing: the side of each epoch's training crops, a pure function of the epoch.

FFCV trains its ImageNet ResNets at low resolution early and at the full one late (min_res to
max_res over a ramp of epochs, rounded to 32 px): a small crop costs (small / full)^2 of the
full step, and a network that learnt coarse features first loses little for it. Evaluation
stays at data.image_size throughout. Because the size is a function of the epoch alone, a
resumed run, any world size and any accumulation train every epoch at the same size.
"""

from __future__ import annotations

import dataclasses

from ..config import DataConfig


def train_size(cfg: DataConfig, epoch: int) -> int:
    """Side of epoch `epoch`'s (0-based) training crops.

    data.image_size when progressive resizing is off (data.progressive_min_size = 0). Otherwise
    data.progressive_min_size up to epoch data.progressive_start_epoch, data.image_size from
    data.progressive_end_epoch on, and between them the straight line from one to the other,
    rounded to the nearest multiple of data.progressive_step (FFCV's rule) and kept within them.
    """
    low, full = cfg.progressive_min_size, cfg.image_size
    if low == 0:
        return full
    start, end = cfg.progressive_start_epoch, cfg.progressive_end_epoch
    if epoch <= start:
        return low
    if epoch >= end:
        return full
    size = low + (full - low) * (epoch - start) / (end - start)
    step = cfg.progressive_step
    return min(full, max(low, int(round(size / step)) * step))


def at_epoch(cfg: DataConfig, epoch: int) -> DataConfig:
    """The data config that builds epoch `epoch`'s training transform: image_size is the epoch's side."""
    size = train_size(cfg, epoch)
    return cfg if size == cfg.image_size else dataclasses.replace(cfg, image_size=size)


def sizes(cfg: DataConfig, epochs: int) -> list[int]:
    """Every epoch's training side, `train_size` over a run of `epochs` (what a config's ramp gives, at a glance)."""
    return [train_size(cfg, e) for e in range(epochs)]
