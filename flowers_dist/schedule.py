"""Learning-rate schedules as pure functions of the optimizer step (or of the epoch, for per-epoch use).

The loop sets the rate before each optimizer step from these functions, so there is no
scheduler object to step: nothing to step twice per epoch under several processes
(Accelerate steps prepared schedulers once per process), and nothing to restore on resume
but the position itself. Steps are optimizer steps: with gradient accumulation, one step is
one global batch, however many micro-batches it took.
"""

from __future__ import annotations

import math

from .config import OptimConfig


def base_lr(cfg: OptimConfig, global_batch_size: int) -> float:
    """optim.lr, scaled for the global batch when optim.lr_scaling=linear.

    Linear scaling (Goyal et al. 2017): k times the batch averages k times as many gradients
    per step, so k times the rate keeps the update per image; it needs warm-up when k is large.
    """
    if cfg.lr_scaling == "linear":
        return cfg.lr * global_batch_size / cfg.reference_batch_size
    return cfg.lr


def warmup_steps(cfg: OptimConfig, steps_per_epoch: int) -> int:
    """Warm-up length in optimizer steps: optim.warmup_steps, or optim.warmup_epochs whole epochs of steps."""
    return cfg.warmup_steps or cfg.warmup_epochs * steps_per_epoch


def lr_at_step(
    cfg: OptimConfig, epoch: int, step: int, steps_per_epoch: int, *, total_epochs: int, global_batch_size: int
) -> float:
    """Learning rate of optimizer step `step` (0-based) of `epoch` (0-based), with `steps_per_epoch` steps an epoch.

    The decay is the epoch's (step: StepLR every optim.step_size epochs; cosine: continuous over
    the run's steps); warm-up, if any, is linear per step from a tenth of the rate to the full
    rate at its last step. onecycle: see onecycle_lr.
    """
    if steps_per_epoch < 1 or not 0 <= step < steps_per_epoch:
        raise ValueError(f"step {step} outside an epoch of {steps_per_epoch} steps")
    k = epoch * steps_per_epoch + step  # optimizer steps taken before this one
    if cfg.schedule == "onecycle":  # its own warm-up (config.py refuses optim.warmup_* beside it)
        return onecycle_lr(cfg, base_lr(cfg, global_batch_size), k, total_epochs * steps_per_epoch)
    if cfg.schedule == "step":
        factor = cfg.gamma ** (epoch // cfg.step_size)
    elif cfg.schedule == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * k / (total_epochs * steps_per_epoch)))
    else:
        factor = 1.0
    warm = warmup_steps(cfg, steps_per_epoch)
    if k < warm:
        factor *= 0.1 + 0.9 * k / warm
    return base_lr(cfg, global_batch_size) * factor


def _cos_anneal(start: float, end: float, pct: float) -> float:
    """torch's OneCycleLR._annealing_cos, term for term (so that the rates match it to the last bit or two)."""
    return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)


def onecycle_lr(cfg: OptimConfig, peak: float, k: int, total: int) -> float:
    """The rate of step `k` (0-based) of `total` under torch's OneCycleLR(max_lr=peak, total_steps=total,
    anneal_strategy="cos", three_phase=False), its learning rate only (momentum stays optim.momentum).

    Cosine up from peak / optim.onecycle_div_factor to the peak over the first optim.onecycle_pct_start of the
    steps, then cosine down to that start rate / optim.onecycle_final_div_factor at the last step.
    """
    start = peak / cfg.onecycle_div_factor
    up_end = float(cfg.onecycle_pct_start * total) - 1  # torch's phase boundary, a step index (may be fractional)
    if k <= up_end:
        return _cos_anneal(start, peak, k / up_end if up_end > 0 else 1.0)  # torch divides by zero at up_end == 0
    return _cos_anneal(peak, start / cfg.onecycle_final_div_factor, (k - up_end) / (total - 1 - up_end))


def lr_at(cfg: OptimConfig, epoch: int, total_epochs: int, global_batch_size: int | None = None) -> float:
    """Learning rate for the whole of `epoch` (0-based) of a run of `total_epochs`: the rate of its first step
    with one step an epoch, so warm-up counts epochs (optim.warmup_steps needs lr_at_step)."""
    if cfg.lr_scaling != "none" and global_batch_size is None:
        raise ValueError("optim.lr_scaling needs the global batch size")
    if cfg.warmup_steps:
        raise ValueError("optim.warmup_steps needs a per-step schedule (lr_at_step)")
    return lr_at_step(
        cfg, epoch, 0, 1, total_epochs=total_epochs, global_batch_size=global_batch_size or cfg.reference_batch_size
    )
