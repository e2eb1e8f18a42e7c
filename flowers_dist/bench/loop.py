"""`bench train`: the real training loop for a fixed number of steps, its time split into data wait, compute and communication.

Every process runs the loop's own `train_step` on batches from the configured loader, set up as
`train` sets it up (same Accelerator, model, optimizer, loader and placement). Each step is
timed on its own, with a device sync before every clock read, so that per step
`data wait + compute = step time` exactly: data wait is the time blocked on the loader, compute
is the rest (forward, backward, update and, with several processes, the gradient all-reduce).
With several processes the same steps are timed again under `no_sync` (no all-reduce); the
difference of the medians is the communication that the overlap inside DDP does not hide. An
all-reduce of one gradient-sized buffer is timed as well, as the unhidden upper bound.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from typing import Any, Iterator

import torch
import torch.distributed as dist
from accelerate.utils import gather_object, set_seed

from ..config import Config
from ..data import build_loader, scan_dataset
from ..distributed import make_accelerator, num_nodes, placement
from ..model import build_model
from ..train import batch_per_process, build_optimizer, sync, train_step
from .common import spread


def _endless(loader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def _timed_steps(batches, model, optimizer, accelerator, device, steps: int, no_sync: bool) -> tuple[list[float], list[float]]:
    """Per-step (data wait, compute) seconds."""
    waits, computes = [], []
    for _ in range(steps):
        sync(device)
        start = time.perf_counter()
        images, labels = next(batches)
        sync(device)  # a batch still being copied is data wait, not compute
        fetched = time.perf_counter()
        with accelerator.no_sync(model) if no_sync else contextlib.nullcontext():
            train_step(model, optimizer, images, labels, accelerator.backward)
        sync(device)
        waits.append(fetched - start)
        computes.append(time.perf_counter() - fetched)
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


def advice(cfg: Config, device: torch.device, bottleneck: str) -> str:
    """The one setting most likely to move the bottleneck."""
    if bottleneck == "data wait":
        if cfg.data.loader == "torch":
            return "data.loader=dali, or more decode workers (data.num_workers)"
        if device.type == "cuda":
            return "more DALI threads (data.num_workers), or hw_decoder_load toward the hardware JPEG decoder"
        return "more DALI threads (data.num_workers); on a GPU host DALI decodes with nvJPEG (mixed)"
    if bottleneck == "communication":
        return "a larger per-process batch (train.global_batch_size), so each all-reduce carries more images"
    if not cfg.model.channels_last:
        return "model.channels_last=true"
    if device.type == "cuda" and cfg.train.mixed_precision == "no":
        return "train.mixed_precision=bf16"
    if not cfg.model.compile:
        return "model.compile=true (`bench step --compile` measures it), or a larger batch"
    return "a larger batch (train.global_batch_size)"


def bench_train(cfg: Config, warmup: int, steps: int) -> tuple[dict[str, Any] | None, Any]:
    """The step-time split of this world; returns (results on the main process else None, accelerator)."""
    accelerator = make_accelerator(cfg.train.device, cfg.train.mixed_precision, compile_model=cfg.model.compile,
                                   cudnn_benchmark=cfg.train.cudnn_benchmark)
    world, device = accelerator.num_processes, accelerator.device
    batch = batch_per_process(cfg.train, world)
    split, _ = scan_dataset(cfg.data.root)
    set_seed(cfg.train.seed)
    with accelerator.main_process_first():
        model = build_model(cfg.model, len(split.classes))
    optimizer = build_optimizer(cfg.optim, model, fused=accelerator.device.type == "cuda")
    model, optimizer = accelerator.prepare(model, optimizer)
    place = placement(accelerator, channels_last=cfg.model.channels_last, workers=cfg.data.num_workers)
    loader = build_loader(cfg.data, split, train=True, batch_per_rank=batch,
                          placement=place, seed=cfg.train.seed)
    batches = _endless(loader)
    model.train()
    _timed_steps(batches, model, optimizer, accelerator, device, warmup, no_sync=False)
    waits, computes = _timed_steps(batches, model, optimizer, accelerator, device, steps, no_sync=False)
    step_times = [w + c for w, c in zip(waits, computes)]
    local = {"rank": accelerator.process_index, "data_wait": spread(waits), "compute": spread(computes), "step_time": spread(step_times)}
    if world > 1:
        _, local_computes = _timed_steps(batches, model, optimizer, accelerator, device, steps, no_sync=True)
        local["compute_no_sync"] = spread(local_computes)
        local["allreduce_gradient_buffer"] = spread(_allreduce_seconds(model, device))
    ranks = gather_object([local])
    if not accelerator.is_main_process:
        return None, accelerator
    wait, step = statistics.median(waits), statistics.median(step_times)
    comm = max(0.0, local["compute"]["median"] - local["compute_no_sync"]["median"]) if world > 1 else 0.0
    compute = step - wait - comm
    parts = {"data wait": wait, "compute": compute, "communication": comm}
    bottleneck = max(parts, key=parts.get)
    return {
        "world_size": world, "num_nodes": num_nodes(accelerator), "device": str(device), "loader": type(loader).__name__,
        "batch_per_process": batch, "global_batch": cfg.train.global_batch_size,
        "warmup": warmup, "steps": steps,
        "images_per_s": cfg.train.global_batch_size / step,
        "images_per_s_per_process": cfg.train.global_batch_size / step / world,
        "step_time": step, "data_wait": wait, "compute": compute, "communication": comm,
        "fractions": {k: v / step for k, v in parts.items()},
        "compute_only_images_per_s": cfg.train.global_batch_size / (step - wait),
        "bottleneck": bottleneck, "advice": advice(cfg, device, bottleneck), "ranks": ranks,
    }, accelerator
