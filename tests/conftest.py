"""Shared helpers: the bundled sample data, and running the CLI as a user would (1..N processes)."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Iterator

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "flowers_sample"
SHARED_FLOWERS = REPO.parent / "shared" / "flowers"

# Small enough for 2 CPU cores: 32 px crops, no worker processes, no terminal bar; the 63 sample photos
# (23 val, a prime), ResNet-18 and the recipe's optimisation and augmentation (StepLR at lr 1e-3, crops
# from 8 % of the area, rotation and colour jitter), whatever configs/quickstart.yaml trains.
TINY = ["data.image_size=32", "data.num_workers=0", "train.progress=lines", "train.global_batch_size=8", "train.eval_batch_size=8",
        "data.root=data/flowers_sample", "model.name=resnet18.tv_in1k", "model.zero_init_last=true",
        "optim.lr=0.001", "optim.schedule=step", "optim.weight_decay=0", "data.scale=[0.08,1.0]",
        "data.rotation=15", "data.color_jitter=0.2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(args: list[str], nprocs: int = 1, env: dict | None = None, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    """Run `python -m flowers_dist ARGS`, under `accelerate launch` when nprocs > 1; env values of None unset."""
    if nprocs > 1:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nprocs),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), "-m", "flowers_dist", *args]
    else:
        cmd = [sys.executable, "-m", "flowers_dist", *args]
    full_env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1" if nprocs > 1 else os.environ.get("OMP_NUM_THREADS", "2"), **(env or {})}
    full_env = {k: v for k, v in full_env.items() if v is not None}  # env={"X": None} unsets X
    proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}")
    return proc


SERVER_LIFETIME_S = 300  # a local server shuts itself down even if a teardown never runs


@contextlib.contextmanager
def local_server(handler) -> Iterator[str]:
    """An HTTP server on 127.0.0.1 for the duration of the block; yields its base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    watchdog = threading.Timer(SERVER_LIFETIME_S, server.shutdown)
    watchdog.daemon = True
    watchdog.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        watchdog.cancel()
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def position(run_dir: Path, steps: int) -> tuple[int, int] | None:
    """(epoch, step inside it) of the run's last `step` row (`steps` per epoch); None before the first."""
    path = run_dir / "metrics.jsonl"
    rows = [r for r in metrics(run_dir) if r["event"] == "step"] if path.exists() else []
    return (rows[-1]["epoch"], rows[-1]["step"] - rows[-1]["epoch"] * steps) if rows else None


def inside_epoch(at: tuple[int, int] | None, epoch: int, steps: int) -> bool:
    """Whether a run stopped at `at` is 1 to steps - 2 steps into `epoch`: the ranks agree after every step, so a
    stop signal sent now is acted on at this step or, if its agreement had begun, the next, both inside the epoch.
    Fails if the run got past that unseen."""
    assert at is None or at <= (epoch, steps - 2), f"the run passed step {steps - 2} of epoch {epoch} unseen: {at}"
    return at is not None and at >= (epoch, 1)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """One tiny finished run on the sample data, shared by tests that need a checkpoint."""
    out = tmp_path_factory.mktemp("runs")
    cli(["train", "--config", "configs/quickstart.yaml", *TINY, "train.epochs=2", f"train.output_dir={out}", "train.name=tiny"])
    return out / "tiny"
