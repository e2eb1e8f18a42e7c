"""Everything only the main process does: the run folder, metrics, checkpoints, console and progress.

Every rank holds a Recorder and calls it the same way; on the other ranks each call does
nothing. This keeps `if is_main` out of the training loop.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable

import torch

from . import checkpoint
from .config import Config, dump


def environment(world_size: int, num_nodes: int, device: torch.device) -> dict[str, Any]:
    """Code version, library versions and hardware, saved with every run."""
    import accelerate
    import timm
    import torchvision

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if device.type == "cuda" else [platform.processor() or platform.machine()]
    return {
        "git_commit": commit,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "accelerate": accelerate.__version__,
        "host": platform.node(),
        "device_type": device.type,
        "devices": devices,
        "cpu_count": os.cpu_count(),
        "world_size": world_size,
        "num_nodes": num_nodes,
    }


class Recorder:
    def __init__(self, run_dir: Path, is_main: bool, progress: str):
        self.run_dir = run_dir
        self.is_main = is_main
        self.use_bar = is_main and (progress == "bar" or (progress == "auto" and sys.stderr.isatty()))
        self.started = time.perf_counter()
        self._bar = None

    # -- run folder -------------------------------------------------------------------------
    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def start(self, cfg: Config, classes: Iterable[str], env: dict[str, Any], start_epoch: int, resumed: bool) -> None:
        if not self.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.checkpoint_dir.glob(".*.tmp-*"):  # a write cut short by a kill
            stale.unlink()
        dump(cfg, self.run_dir / "config.yaml")
        (self.run_dir / "classes.json").write_text(json.dumps(list(classes), indent=1) + "\n")
        (self.run_dir / "environment.json").write_text(json.dumps(env, indent=1) + "\n")
        # A killed run can have logged an epoch whose checkpoint never landed; it is trained again
        # after a resume, and readers keep the last record of each epoch.
        self.log({"event": "resume" if resumed else "start", "from_epoch": start_epoch,
                  "world_size": env["world_size"], "devices": env["devices"]})

    def log(self, record: dict[str, Any]) -> None:
        """Append one JSON line and push it to disk: a crash loses at most the line being written."""
        if not self.is_main:
            return
        record = {"time": round(time.time(), 3), **record}
        with open(self.metrics_path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def save_checkpoint(self, state: dict[str, Any], is_best: bool) -> None:
        if not self.is_main:
            return
        checkpoint.atomic_save(state, self.checkpoint_dir / "last.pt")
        if is_best:
            checkpoint.atomic_save(state, self.checkpoint_dir / "best.pt")

    # -- console ----------------------------------------------------------------------------
    def print(self, message: str) -> None:
        if self.is_main:
            print(message, flush=True)

    def epoch_bar(self, total: int, epoch: int, epochs: int):
        if self.use_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=f"epoch {epoch + 1}/{epochs}", unit="step", dynamic_ncols=True, leave=False)
        return self

    def advance(self, steps: int, loss: float | None = None, images_per_s: float | None = None) -> None:
        if self._bar is None:
            return
        self._bar.update(steps)
        if loss is not None:
            self._bar.set_postfix(loss=f"{loss:.3f}", img_s=f"{images_per_s:.0f}" if images_per_s else "-", refresh=False)

    def close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
