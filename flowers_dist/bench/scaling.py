"""`bench scaling`: `bench train` on 1..N processes of this node, and the scaling efficiency.

Each world size is a fresh `accelerate launch --multi_gpu --num_processes k` (one plain process
for k = 1) running `bench train` into its own JSON file. The per-process batch stays that of
one process (weak scaling: global batch = k x train.global_batch_size); on the CPU the cores are
split evenly among the processes (OMP_NUM_THREADS), so efficiency there measures how well k
processes share the same cores, while on GPUs each process has its own device.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from ..data import default_workers


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for a launch's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(k: int) -> list[str]:
    """`accelerate launch` of k processes on this node, before its `-m module` or script: DDP on the GPUs, or gloo
    on the CPU (--multi_gpu with CPU forced; `--cpu --num_processes k` would start one process)."""
    flags = f"--multi_gpu --num_processes {k} --num_machines 1 --mixed_precision no --dynamo_backend no"
    return [sys.executable, "-m", "accelerate.commands.launch", *flags.split(), "--main_process_port", str(free_port())]


def launch_command(k: int, args: list[str]) -> list[str]:
    """`python -m flowers_dist ARGS` in one plain process (k = 1) or k processes under `accelerate launch`."""
    prefix = [sys.executable] if k == 1 else accelerate_launch(k)
    return [*prefix, "-m", "flowers_dist", *args]


def bench_scaling(
    config: Path,
    overrides: list[str],
    micro_batch: int,
    max_processes: int,
    warmup: int,
    steps: int,
    workdir: Path,
    timeout: float = 1800,
) -> dict[str, Any]:
    """One row per world size: images/s, the split of the step time and the efficiency against k x one process."""
    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for k in range(1, max_processes + 1):
        out = workdir / f"train-{k}.json"
        args = [
            "bench",
            "train",
            "--config",
            str(config),
            *overrides,
            f"train.global_batch_size={micro_batch * k}",
            "--warmup",
            str(warmup),
            "--steps",
            str(steps),
            "--out",
            str(out),
        ]
        env = {**os.environ, "WANDB_MODE": "disabled"}
        if not torch.cuda.is_available():
            env["OMP_NUM_THREADS"] = str(default_workers(k))
        proc = subprocess.run(launch_command(k, args), env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"bench train on {k} process(es) exited {proc.returncode}:\n{proc.stderr[-3000:]}")
        result = json.loads(out.read_text())["results"]
        rows.append(
            {
                "processes": k,
                "images_per_s": result["images_per_s"],
                "step_time": result["step_time"],
                "fractions": result["fractions"],
                "bottleneck": result["bottleneck"],
                "json": str(out),
            }
        )
    for row in rows:
        row["efficiency"] = row["images_per_s"] / (row["processes"] * rows[0]["images_per_s"])
    return {
        "micro_batch_size": micro_batch,
        "max_processes": max_processes,
        "warmup": warmup,
        "steps": steps,
        "rows": rows,
    }
