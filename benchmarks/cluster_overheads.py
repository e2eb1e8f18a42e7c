"""What surviving the cluster costs per step: the ranks' stop-check all-reduce and a periodic checkpoint's wait.

Measured side by side in one run, on 2 gloo processes on this machine:
- the stop check: one all-reduce of two floats (what `train.agree` sends every train.stop_check_every steps);
- a periodic checkpoint as the loop sees it: gathering the per-rank parts, building the state and
  copying ResNet-18's weights and SGD momentum to the writer (the write itself runs on a thread);
- one training step of ResNet-18 (batch 8 per process, 64 px, fp32) for scale.

    python benchmarks/cluster_overheads.py [--steps 20] [--checks 200]

Prints one JSON line per rank-0 figure and a summary; writes benchmarks/results/cluster-overheads-<host>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def _time_stop_check(checks: int) -> float:
    """Seconds per all-reduce of two floats, after a warm-up."""
    flags = torch.zeros(2)
    for _ in range(20):  # warm-up: connections, allocator
        dist.all_reduce(flags)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(checks):
        dist.all_reduce(flags)
    return (time.perf_counter() - start) / checks


def _time_steps(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int) -> list[float]:
    """Seconds per DDP training step, the first two left out."""
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    images, labels = torch.randn(8, 3, 64, 64), torch.randint(0, 5, (8,))
    step_times = []
    for i in range(steps + 2):
        dist.barrier()
        t = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(ddp(images), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i >= 2:
            step_times.append(time.perf_counter() - t)
    return step_times


def _time_checkpoints(
    rank: int, world: int, model: torch.nn.Module, opt: torch.optim.Optimizer
) -> tuple[list[float], float | None, int]:
    """The loop's waits for 3 checkpoints, and on rank 0 the last background write's seconds and the file's bytes."""
    from flowers_dist import checkpoint_file

    # The loop's side of a periodic checkpoint: gather parts (collective), state dicts, CPU copy for the writer.
    writer = checkpoint_file.BackgroundWriter()
    waits, write = [], None
    with tempfile.TemporaryDirectory() as folder:
        for i in range(3):
            dist.barrier()
            t = time.perf_counter()
            parts: list = [None] * world
            dist.all_gather_object(parts, {"sums": [0.0, 0.0, 8.0], "loader": None})
            if rank == 0:
                state = {
                    "format": checkpoint_file.FORMAT,
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "parts": parts,
                }
                writer.save(state, [Path(folder) / f"step-{i}.pt", Path(folder) / "last.pt"])
            waits.append(time.perf_counter() - t)
            if rank == 0:
                t = time.perf_counter()
                writer.wait()
                write = time.perf_counter() - t
        size = (Path(folder) / "last.pt").stat().st_size if rank == 0 else 0
    return waits, write, size


def worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    """One gloo rank: time the stop check, the step and the checkpoint wait; rank 0 writes the figures to `out`."""
    import timm

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    check = _time_stop_check(args.checks)
    model = timm.create_model("resnet18", num_classes=5)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    step_times = _time_steps(model, opt, args.steps)
    waits, write, size = _time_checkpoints(rank, world, model, opt)
    if rank == 0:
        Path(out).write_text(
            json.dumps(
                {
                    "stop_check_allreduce_s": check,
                    "train_step_s": statistics.median(step_times),
                    "checkpoint_loop_wait_s": statistics.median(waits),
                    "checkpoint_background_write_s": write,
                    "checkpoint_bytes": size,
                }
            )
        )
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--checks", type=int, default=200)
    parser.add_argument("--world", type=int, default=2)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
        mp.spawn(worker, args=(args.world, port, args, tmp.name), nprocs=args.world, join=True)
        figures = json.loads(Path(tmp.name).read_text())
    check, step = figures["stop_check_allreduce_s"], figures["train_step_s"]
    wait = figures["checkpoint_loop_wait_s"]
    result = {
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "host": socket.gethostname()},
        "torch": torch.__version__,
        "world_size": args.world,
        **figures,
        "stop_check_share_per_step_every_10": check / 10 / step,
        "checkpoint_wait_in_steps": wait / step,
    }
    out = REPO / "benchmarks" / "results" / f"cluster-overheads-{socket.gethostname()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    print(
        f"\nstop check: {check * 1e6:.0f} us per all-reduce = {100 * check / 10 / step:.3f} % of a "
        f"{step * 1e3:.0f} ms step when done every 10 steps"
    )
    print(
        f"periodic checkpoint: the loop waits {wait * 1e3:.0f} ms (= {wait / step:.2f} steps) per checkpoint; "
        f"the {figures['checkpoint_bytes'] / 1e6:.0f} MB write takes {figures['checkpoint_background_write_s']:.2f} s on a thread"
    )


if __name__ == "__main__":
    main()
