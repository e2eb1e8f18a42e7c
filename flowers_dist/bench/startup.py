"""`bench startup`: how long a fresh `flowers-dist train` takes to its first optimizer step, and what the imports cost.

Each repeat starts a new process (`python -m flowers_dist train` with the config, one epoch of
one step, a log line every step) and times, from the moment it is launched, the appearance of
its first `step` row in metrics.jsonl: imports, the Accelerator, the model, the loaders and the
first step (cuDNN's algorithm search included), everything a short run pays once. The imports
alone are timed in another fresh process, with `-X importtime`'s largest packages beside them.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .. import metrics_log
from .common import spread

# What `train` imports before its first step, in one line (the loaders' modules are imported on use).
IMPORTS = "import flowers_dist.cli, flowers_dist.train, flowers_dist.data.dali"
# The packages whose import time is reported (a package imported inside another counts in both).
PACKAGES = (
    "torch",
    "torchvision",
    "timm",
    "accelerate",
    "nvidia.dali",
    "numba",
    "numpy",
    "PIL",
    "yaml",
    "torch._dynamo",
)


def first_step_seconds(config: Path, overrides: list[str], run_dir: Path, timeout: float = 600) -> float:
    """Wall seconds from launching a 1-step training run to its first `step` row."""
    metrics = metrics_log.path_of(run_dir)
    cmd = [
        sys.executable,
        "-m",
        "flowers_dist",
        "train",
        "--config",
        str(config),
        *overrides,
        "train.epochs=1",
        "train.max_steps_per_epoch=1",
        "train.log_every=1",
        "train.progress=lines",
        f"train.output_dir={run_dir.parent}",
        f"train.name={run_dir.name}",
    ]
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while time.perf_counter() - start < timeout:
            if metrics_log.events(metrics_log.read(metrics), "step"):
                return time.perf_counter() - start
            if proc.poll() is not None and not metrics.exists():
                break
            time.sleep(0.01)
        proc.wait(timeout=timeout)
        if proc.returncode:
            raise RuntimeError(f"the startup run exited {proc.returncode}: {proc.stderr.read()[-2000:]}")
        return time.perf_counter() - start  # finished between two polls
    finally:
        if proc.poll() is None:
            proc.wait(timeout=timeout)


def import_seconds() -> tuple[float, list[dict[str, Any]]]:
    """Wall seconds of the training imports in a fresh interpreter, and the import time of each of PACKAGES, largest first."""
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", IMPORTS], capture_output=True, text=True, timeout=600, check=False
    )
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"importing the training modules failed: {proc.stderr[-2000:]}")
    # Each package's own import (its first line, wherever it nests), including what it imports in turn.
    first: dict[str, int] = {}
    for line in proc.stderr.splitlines():  # "import time: self [us] | cumulative | <indent>package"
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \|\s+(\S+)$", line)
        if m and m.group(2) in PACKAGES and m.group(2) not in first:
            first[m.group(2)] = int(m.group(1))
    largest = sorted(first.items(), key=lambda kv: -kv[1])
    return seconds, [{"package": k, "cumulative_s": v / 1e6} for k, v in largest]


def bench_startup(config: Path, overrides: list[str], workdir: Path, repeats: int) -> dict[str, Any]:
    """Time to first step and import time, each `repeats` times (median and range)."""
    firsts, imports, largest = [], [], []
    for i in range(repeats):
        imp, largest = import_seconds()
        imports.append(imp)
        firsts.append(first_step_seconds(config, overrides, workdir / f"startup-{i}"))
    return {
        "repeats": repeats,
        "time_to_first_step_s": spread(firsts),
        "import_s": spread(imports),
        "largest_imports": largest,
    }
