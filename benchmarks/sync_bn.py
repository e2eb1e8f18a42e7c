"""What model.sync_bn costs per training step on the CPU: ResNet-18 under DDP on 2 gloo processes, plain BatchNorm vs SyncBatchNorm.

Both settings run in turns (`--rounds`), in the same 2 processes, so that load from other jobs
falls on both alike; each turn runs `--warmup` untimed steps and then `--steps` timed ones of the
loop's own step (`steps.optimizer_step`) (forward, loss, backward with DDP's gradient all-reduce, SGD). The
difference of the medians is what synchronising BatchNorm adds: one all-reduce of (2C + 1)
floats per BatchNorm layer in the forward and one in the backward (20 layers in ResNet-18).
Prints the table and writes benchmarks/results/sync_bn-<host>.json.

    python benchmarks/sync_bn.py [--batch 8] [--size 64] [--rounds 3] [--steps 10]
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
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WORLD = 2


def _worker(rank: int, store_path: str, args: argparse.Namespace, out: str) -> None:
    import timm
    from torch.nn.parallel import DistributedDataParallel as DDP

    from flowers_dist.config import OptimConfig
    from flowers_dist.steps import build_optimizer, one_batch_step
    from flowers_dist.sync_bn import convert

    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, WORLD), rank=rank, world_size=WORLD)
    models = {}
    for mode in ("plain", "sync"):
        torch.manual_seed(0)
        model = timm.create_model("resnet18", pretrained=False, num_classes=5)
        if mode == "sync":
            model, _ = convert(model)
        ddp = DDP(model)
        models[mode] = (ddp, build_optimizer(OptimConfig(lr=1e-3), ddp))
    g = torch.Generator().manual_seed(rank)
    images = torch.randn(args.batch, 3, args.size, args.size, generator=g)
    labels = torch.randint(0, 5, (args.batch,), generator=g)
    times: dict[str, list[float]] = {"plain": [], "sync": []}
    for _ in range(args.rounds):
        for mode, (model, opt) in models.items():
            for _ in range(args.warmup):
                one_batch_step(model, opt, images, labels)
            for _ in range(args.steps):
                dist.barrier()  # both ranks start the step together: a step's time is then the slower rank's
                start = time.perf_counter()
                one_batch_step(model, opt, images, labels)
                times[mode].append(time.perf_counter() - start)
    if rank == 0:
        Path(out).write_text(json.dumps(times))
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8, help="images per process")
    ap.add_argument("--size", type=int, default=64, help="image side in pixels")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "times.json")
        mp.spawn(_worker, args=(os.path.join(tmp, "store"), args, out), nprocs=WORLD, join=True)
        times = json.loads(Path(out).read_text())
    med = {mode: statistics.median(t) for mode, t in times.items()}
    cost = med["sync"] - med["plain"]
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    print(
        f"ResNet-18, {WORLD} gloo processes x {args.threads} thread(s), {args.batch} images/process at {args.size} px, "
        f"{args.rounds} rounds x {args.steps} steps; {cpu}; load average {os.getloadavg()[0]:.2f}"
    )
    for mode, t in times.items():
        print(
            f"  {mode:5s} BatchNorm: median step {med[mode] * 1e3:8.1f} ms (range {min(t) * 1e3:.1f}-{max(t) * 1e3:.1f})"
        )
    print(
        f"  SyncBatchNorm adds {cost * 1e3:+.1f} ms per step ({cost / med['plain']:+.1%}), "
        f"{cost / 40 * 1e6:+.0f} us per all-reduce (20 layers x forward and backward)"
    )
    result = {
        "benchmark": "sync_bn",
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "cpu": cpu,
        "load_average": os.getloadavg(),
        "torch": torch.__version__,
        "args": vars(args),
        "median_step_s": med,
        "cost_per_step_s": cost,
        "relative_cost": cost / med["plain"],
        "step_times_s": times,
    }
    dest = REPO / "benchmarks" / "results" / f"sync_bn-{socket.gethostname()}.json"
    dest.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {dest.relative_to(REPO)}")


if __name__ == "__main__":
    main()
