"""Start Accelerate for this process and check that the world it sees is the one launched."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

from .config import ConfigError
from .data import Placement, default_workers


def make_accelerator(
    device: str,
    mixed_precision: str,
    log_with: str | None = None,
    compile_model: bool = False,
    collective_timeout: float | None = None,
    cudnn_benchmark: bool = True,
) -> Accelerator:
    """The Accelerator for this process: CPU or GPU, precision, trackers, and torch.compile when asked.

    compile_model=False leaves the choice to Accelerate's own setting (`accelerate launch
    --dynamo_backend`, ACCELERATE_DYNAMO_BACKEND), off by default. collective_timeout (seconds)
    bounds every collective's wait for a peer (torch's default is 30 minutes on gloo). cudnn_benchmark applies on
    CUDA only: training batches have one fixed shape (the last partial batch is dropped), so
    the algorithm search runs once per shape (train and eval) and its winner is reused.
    """
    use_cpu = device == "cpu" or not torch.cuda.is_available()
    if use_cpu and mixed_precision == "fp16":
        # Accelerate would silently run fp32 on the CPU: no autocast, no scaler.
        raise ConfigError("config key 'train.mixed_precision': fp16 needs a GPU; use bf16 or no on the CPU")
    # cpu=True is what makes several CPU processes form one gloo group; without it every
    # process on a GPU-less host believes it is rank 0 of 1.
    handlers = [InitProcessGroupKwargs(timeout=timedelta(seconds=collective_timeout))] if collective_timeout else []
    accelerator = Accelerator(
        cpu=use_cpu,
        mixed_precision=mixed_precision,
        log_with=log_with,
        dynamo_backend="inductor" if compile_model else None,
        kwargs_handlers=handlers,
    )
    if accelerator.device.type == "cuda":
        torch.backends.cudnn.benchmark = cudnn_benchmark
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != launched:
        raise RuntimeError(
            f"launched {launched} processes but Accelerate formed a world of {accelerator.num_processes}; on the CPU launch with `accelerate launch --multi_gpu --num_processes N` (not --cpu)"
        )
    return accelerator


def placement(
    accelerator: Accelerator, *, channels_last: bool, workers: int, dtype: torch.dtype = torch.float32
) -> Placement:
    """Plain values for the data code: global rank for sharding, the local device for placement."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return Placement(
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        device=accelerator.device,
        dtype=dtype,
        channels_last=channels_last,
        workers=default_workers(local_world) if workers < 0 else workers,
    )


def num_nodes(accelerator: Accelerator) -> int:
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(accelerator.num_processes)))
    return max(1, accelerator.num_processes // max(1, local_world))
