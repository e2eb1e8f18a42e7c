"""`bench train`: the run's own optimizer step for a fixed number of steps, its time split into data wait, compute and communication.

The run is set up by parts.py exactly as `train` sets it up (Accelerator, data check, model with
sync_bn as configured, optimizer, placement, the configured loader, gradient accumulation), and
every step is steps.optimizer_step, the function the training loop calls. Each optimizer step
(all its micro-batches) is timed on its own, with a device sync before every clock read, so
that per step `data wait + compute = step time` exactly: data wait is the time blocked on the
loader, compute is the rest (forward, backward, update and, with several processes, the
gradient all-reduce). With several processes the same steps are timed again with the
all-reduce left out (every micro-batch under no_sync); the difference of the medians is the
communication that the overlap inside DDP does not hide. An all-reduce of one gradient-sized
buffer is timed as well, as the unhidden upper bound. Images per second are those of the
global batch per optimizer step.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist
from accelerate.utils import broadcast_object_list, gather_object

from ..config import Config
from ..distributed import num_nodes
from ..parts import Parts, batch_layout, build_parts, checked_data, learning_rate, run_accelerator
from ..steps import LoaderClock, endless, one_batch_step, optimizer_step, sync
from .advice import advice, cpu_bf16_flags, measure_bf16_speedup
from .common import spread


def _timed_steps(
    parts: Parts, accelerator, batches, lr: float, steps: int, label_smoothing: float, sync_gradients: bool = True
) -> tuple[list[float], list[float]]:
    """Per optimizer step (data wait, compute) seconds: the run's step, its levers (smoothing, mixup, the EMA) too."""
    device = accelerator.device
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    waits, computes = [], []
    for _ in range(steps):
        clock = LoaderClock(device, exact=True)  # a batch still being copied is data wait, not compute
        sync(device)
        start = time.perf_counter()
        optimizer_step(
            parts.model,
            parts.optimizer,
            batches,
            accum=parts.layout.accum,
            lr=lr,
            sums=sums,
            backward=accelerator.backward,
            no_sync=accelerator.no_sync,
            clock=clock,
            sync_gradients=sync_gradients,
            label_smoothing=label_smoothing,
            ema=parts.ema,
            mixup=parts.mixup,
        )
        sync(device)
        waits.append(clock.waited)
        computes.append(time.perf_counter() - start - clock.waited)
    return waits, computes


def _allreduce_seconds(model: torch.nn.Module, device: torch.device, reps: int = 3) -> list[float]:
    buffer = torch.zeros(sum(p.numel() for p in model.parameters() if p.requires_grad), device=device)
    dist.all_reduce(buffer)  # warm-up: connections and buffers
    times = []
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        dist.all_reduce(buffer)
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def bench_train(cfg: Config, warmup: int, steps: int) -> tuple[dict[str, Any] | None, Any]:
    """The step-time split of this world; returns (results on the main process else None, accelerator)."""
    accelerator = run_accelerator(cfg)
    data = checked_data(cfg, accelerator)
    if accelerator.is_main_process:
        print(data.skipped.line(), flush=True)
    parts = build_parts(cfg, accelerator, data, batch_layout(cfg.train, accelerator.num_processes, len(data.train)))
    layout = parts.layout
    lr = learning_rate(cfg, layout, 0, 0)  # the run's first step's
    batches = endless(parts.train_loader)
    parts.model.train()
    _timed_steps(parts, accelerator, batches, lr, warmup, cfg.optim.label_smoothing)
    local = _rank_times(parts, accelerator, batches, lr, steps, cfg.optim.label_smoothing)
    bf16_speedup = _bf16_speedup(parts, accelerator, batches)
    ranks = gather_object([local])
    if not accelerator.is_main_process:
        return None, accelerator
    split = _split(local, accelerator.num_processes)
    bottleneck = max(split, key=split.get)
    step = sum(split.values())
    return {
        "world_size": accelerator.num_processes,
        "num_nodes": num_nodes(accelerator),
        "device": str(accelerator.device),
        **parts.choices(),
        "sync_bn_why": parts.sync_bn_why,
        "global_batch": layout.global_batch,
        "data_check_skipped": data.skipped.count,
        "warmup": warmup,
        "steps": steps,
        "steps_are": "optimizer steps (grad_accum_steps micro-batches each)",
        "images_per_s": layout.global_batch / step,
        "images_per_s_per_process": layout.global_batch / step / accelerator.num_processes,
        "step_time": step,
        "data_wait": split["data wait"],
        "compute": split["compute"],
        "communication": split["communication"],
        "fractions": {k: v / step for k, v in split.items()},
        "compute_only_images_per_s": layout.global_batch / (step - split["data wait"]),
        "bottleneck": bottleneck,
        "bf16_speedup": bf16_speedup,
        "cpu_bf16_flags": list(cpu_bf16_flags()),
        "advice": advice(cfg, accelerator.device, bottleneck, bf16_speedup=bf16_speedup),
        "ranks": ranks,
    }, accelerator


def _rank_times(parts: Parts, accelerator, batches, lr: float, steps: int, label_smoothing: float) -> dict[str, Any]:
    """This rank's timed steps; with several processes also without the all-reduce, and one gradient-sized all-reduce."""
    waits, computes = _timed_steps(parts, accelerator, batches, lr, steps, label_smoothing)
    local = {
        "rank": accelerator.process_index,
        "data_wait": spread(waits),
        "compute": spread(computes),
        "step_time": spread([w + c for w, c in zip(waits, computes)]),
    }
    if accelerator.num_processes > 1:
        _, local_computes = _timed_steps(parts, accelerator, batches, lr, steps, label_smoothing, sync_gradients=False)
        local["compute_no_sync"] = spread(local_computes)
        local["allreduce_gradient_buffer"] = spread(_allreduce_seconds(parts.model, accelerator.device))
    return local


def _split(local: dict[str, Any], world: int) -> dict[str, float]:
    """The median step as data wait + compute + communication (the all-reduce time that DDP's overlap does not hide)."""
    wait, step = local["data_wait"]["median"], local["step_time"]["median"]
    comm = max(0.0, local["compute"]["median"] - local["compute_no_sync"]["median"]) if world > 1 else 0.0
    return {"data wait": wait, "compute": step - wait - comm, "communication": comm}


def _bf16_speedup(parts: Parts, accelerator, batches) -> float | None:
    """fp32 over bf16 step time on a CPU with bf16 instructions (the main process's), else None: nothing to decide.

    Whether bf16 pays is the processor's answer, not a rule, so the step is timed both ways. Every
    rank times it, on the prepared model: the step holds collectives (DDP's all-reduce, sync_bn's)
    that every rank must join, so the main process's decision is broadcast first.
    """
    decision = [accelerator.device.type == "cpu" and bool(cpu_bf16_flags())]
    if accelerator.num_processes > 1:
        broadcast_object_list(decision)
    if not decision[0]:
        return None
    images, labels = next(batches)

    def step() -> None:
        one_batch_step(parts.model, parts.optimizer, images, labels, accelerator.backward)

    return measure_bf16_speedup(step)
