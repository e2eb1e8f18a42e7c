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

import statistics
import time
from typing import Any

import torch
import torch.distributed as dist
from accelerate.utils import gather_object

from ..config import Config
from ..distributed import num_nodes
from ..parts import Parts, build_parts, checked_data, run_accelerator
from ..schedule import lr_at_step
from ..steps import LoaderClock, endless, one_batch_step, optimizer_step, sync
from .advice import advice, cpu_bf16_flags, measure_bf16_speedup
from .common import spread


def _timed_steps(
    parts: Parts, accelerator, batches, lr: float, steps: int, sync_gradients: bool = True
) -> tuple[list[float], list[float]]:
    """Per optimizer step (data wait, compute) seconds."""
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
    parts = build_parts(cfg, accelerator, data)
    layout, world, device = parts.layout, accelerator.num_processes, accelerator.device
    lr = lr_at_step(
        cfg.optim, 0, 0, layout.steps_per_epoch, total_epochs=cfg.train.epochs, global_batch_size=layout.global_batch
    )
    batches = endless(parts.train_loader)
    parts.model.train()
    _timed_steps(parts, accelerator, batches, lr, warmup)
    waits, computes = _timed_steps(parts, accelerator, batches, lr, steps)
    step_times = [w + c for w, c in zip(waits, computes)]
    local = {
        "rank": accelerator.process_index,
        "data_wait": spread(waits),
        "compute": spread(computes),
        "step_time": spread(step_times),
    }
    if world > 1:
        _, local_computes = _timed_steps(parts, accelerator, batches, lr, steps, sync_gradients=False)
        local["compute_no_sync"] = spread(local_computes)
        local["allreduce_gradient_buffer"] = spread(_allreduce_seconds(parts.model, device))
    ranks = gather_object([local])
    if not accelerator.is_main_process:
        return None, accelerator
    wait, step = statistics.median(waits), statistics.median(step_times)
    comm = max(0.0, local["compute"]["median"] - local["compute_no_sync"]["median"]) if world > 1 else 0.0
    compute = step - wait - comm
    split = {"data wait": wait, "compute": compute, "communication": comm}
    bottleneck = max(split, key=split.get)
    bf16_speedup = None
    if device.type == "cpu" and bottleneck == "compute" and cpu_bf16_flags():
        # Whether bf16 pays here is the processor's answer, not a rule: time the step both ways, on the
        # main process's model without DDP (no collective the other ranks would have to join).
        images, labels = next(batches)
        bare = accelerator.unwrap_model(parts.model, keep_torch_compile=False)
        bf16_speedup = measure_bf16_speedup(lambda: one_batch_step(bare, parts.optimizer, images, labels))
    return {
        "world_size": world,
        "num_nodes": num_nodes(accelerator),
        "device": str(device),
        **parts.choices(),
        "sync_bn_why": parts.sync_bn_why,
        "global_batch": layout.global_batch,
        "images_per_step": layout.global_batch,
        "data_check_skipped": data.skipped.count,
        "warmup": warmup,
        "steps": steps,
        "steps_are": "optimizer steps (grad_accum_steps micro-batches each)",
        "images_per_s": layout.global_batch / step,
        "images_per_s_per_process": layout.global_batch / step / world,
        "step_time": step,
        "data_wait": wait,
        "compute": compute,
        "communication": comm,
        "fractions": {k: v / step for k, v in split.items()},
        "compute_only_images_per_s": layout.global_batch / (step - wait),
        "bottleneck": bottleneck,
        "bf16_speedup": bf16_speedup,
        "cpu_bf16_flags": list(cpu_bf16_flags()),
        "advice": advice(cfg, device, bottleneck, bf16_speedup=bf16_speedup),
        "ranks": ranks,
    }, accelerator
