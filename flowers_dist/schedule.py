"""Learning-rate schedules as pure functions of the epoch.

The loop sets the rate at the start of each epoch from these functions, so there is no
scheduler object to step: nothing to step twice per epoch under several processes
(Accelerate steps prepared schedulers once per process), and nothing to restore on resume
but the epoch itself.
"""

from __future__ import annotations

import math

from .config import OptimConfig


def lr_at(cfg: OptimConfig, epoch: int, total_epochs: int) -> float:
    """Learning rate for `epoch` (0-based) of a run of `total_epochs`."""
    if cfg.schedule == "step":
        factor = cfg.gamma ** (epoch // cfg.step_size)
    elif cfg.schedule == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * epoch / total_epochs))
    else:
        factor = 1.0
    if epoch < cfg.warmup_epochs:
        # Linear from lr/10 at epoch 0 up to the scheduled rate at the end of warm-up.
        factor *= 0.1 + 0.9 * epoch / cfg.warmup_epochs
    return cfg.lr * factor
