"""Data sets on disk, the loader contract, and the factory that picks a loader."""

from __future__ import annotations

import logging
import os
import platform
import sys
from typing import TYPE_CHECKING

from ..config import DataConfig
from .folder import DataError, Split, scan_dataset, scan_split
from .shards import is_packed

if TYPE_CHECKING:
    from .contract import BatchLoader, Placement, ReaderState

log = logging.getLogger(__name__)


def __getattr__(name: str):
    # The contract needs torch; importing it on first use keeps `flowers-dist data fetch` free of it.
    if name in ("BatchLoader", "Placement"):
        from . import contract

        return getattr(contract, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BatchLoader",
    "DataError",
    "Placement",
    "Split",
    "build_loader",
    "dali_status",
    "default_workers",
    "is_packed",
    "scan_dataset",
    "scan_split",
]


def default_workers(local_world_size: int) -> int:
    """The cores this process may use, split evenly among the processes on this node."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, local_world_size))


def dali_status() -> tuple[bool, str]:
    """Whether the DALI loader can run here, and why (for the log line and the error)."""
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "aarch64"):
        return False, f"DALI has no wheels for {sys.platform}/{platform.machine()}"
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except (ImportError, OSError, RuntimeError) as exc:  # OSError: a wheel whose CUDA libraries do not load
        return (
            False,
            f"nvidia.dali does not import ({exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''})",
        )
    return True, f"nvidia.dali {nvidia.dali.__version__} imports"


def build_loader(
    cfg: DataConfig,
    split: Split,
    *,
    train: bool,
    batch_size: int,
    placement: Placement,
    seed: int,
    max_steps: int = 0,
    resume_state: ReaderState | str | None = None,
    accum: int = 1,
) -> BatchLoader:
    """The loader that cfg.loader names (auto: DALI when it imports, else PyTorch), behind the one contract.

    `batch_size` is this process's batch: in training the micro-batch (train.micro_batch_size), `accum` of
    them per optimizer step (the PyTorch loader deals each global batch as contract.train_shard says;
    `max_steps` counts micro-batches); in evaluation train.eval_batch_size.

    `resume_state` is this rank's part of what the loaders returned from `resume_state()` when the run
    was saved (`contract.carried_state`). Both loaders name the samples they hand out (`trained()`).
    `split` is a folder's files or a pack's samples (shards.split); both loaders read either.
    """
    kind = cfg.loader
    if kind in ("dali", "auto"):
        ok, why = dali_status()
        if kind == "dali" and not ok:
            raise DataError(
                f"data.loader=dali: {why}; install it with `pip install nvidia-dali-cuda130` "
                "(nvidia-dali-cuda120 for CUDA 12 torch), or set data.loader=torch"
            )
        if kind == "auto":
            kind = "dali" if ok else "torch"
            if train and placement.rank == 0:  # once per run: the training loader is built once, first
                log.info("data.loader=auto: using the %s loader (%s)", kind, why)
    if kind == "dali":
        from .dali import build_dali_loader

        return build_dali_loader(cfg, split, train, batch_size, placement, seed, max_steps, resume_state, accum=accum)
    from .torch_loader import build_torch_loader

    return build_torch_loader(cfg, split, train, batch_size, placement, seed, max_steps, accum)
