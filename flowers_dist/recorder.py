"""Everything only the main process does: the run folder's records, metrics, W&B, console and progress.

Every rank holds a Recorder and calls it the same way; on the other ranks each call does
nothing. This keeps `if is_main` out of the training loop.

Every number goes to metrics.jsonl and, when tracking is on, to W&B with one monotonically
increasing `step` (the global optimizer step) on every call: W&B silently drops rows when
calls with and without `step` are mixed. Records logged at the same step merge into one row.
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

from . import tracking
from .config import Config, TrackingConfig, dump
from .errors import DiskError


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
    def __init__(self, run_dir: Path, is_main: bool, progress: str, accelerator=None,
                 tracking_cfg: TrackingConfig | None = None, wandb_mode: str = "disabled"):
        self.run_dir = run_dir
        self.is_main = is_main
        self.use_bar = is_main and (progress == "bar" or (progress == "auto" and sys.stderr.isatty()))
        self.started = time.perf_counter()
        self._bar = None
        self._accelerator = accelerator  # every rank calls end_training (it tears down the process group)
        self._tracking_cfg = tracking_cfg
        self._wandb = is_main and accelerator is not None and tracking_cfg is not None and wandb_mode != "disabled"
        self._wandb_mode = wandb_mode
        self._classes: list[str] = []

    def continue_clock(self, elapsed: float) -> None:
        """After a resume, count run time on from where the checkpoint left it (training time, not wall time between)."""
        self.started = time.perf_counter() - elapsed

    # -- run folder -------------------------------------------------------------------------
    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    def start(self, cfg: Config, classes: Iterable[str], env: dict[str, Any], start_epoch: int, resumed: bool,
              start_step: int = 0) -> None:
        if not self.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.repair_metrics()
        dump(cfg, self.run_dir / "config.yaml")
        (self.run_dir / "classes.json").write_text(json.dumps(list(classes), indent=1) + "\n")
        (self.run_dir / "environment.json").write_text(json.dumps(env, indent=1) + "\n")
        # A killed run can have logged an epoch whose checkpoint never landed; it is trained again
        # after a resume, and readers keep the last record of each epoch.
        self.log({"event": "resume" if resumed else "start", "from_epoch": start_epoch, "from_step": start_step,
                  "world_size": env["world_size"], "devices": env["devices"]})
        self._classes = list(classes)
        if self._wandb:
            self._accelerator.init_trackers(self._tracking_cfg.project, config=tracking.run_config(cfg, env, self._classes),
                                            init_kwargs=tracking.init_kwargs(self._tracking_cfg, self._wandb_mode, self.run_dir))
            if self._wandb_mode == "offline":
                run = self._accelerator.get_tracker("wandb", unwrap=True)
                self.print(f"W&B is offline (no credentials, or asked for); upload later with: wandb sync {Path(run.dir).parent}")

    def log_step(self, record: dict[str, Any]) -> None:
        """One `step` row: training loss, learning rate and throughput over the last log interval."""
        if not self.is_main:
            return
        self.log({"event": "step", **record})
        if self._wandb:
            self._accelerator.log(tracking.step_values(record), step=record["step"])

    def log_epoch(self, record: dict[str, Any]) -> None:
        """One `epoch` row: train/val accuracy, per-class accuracy, the confusion matrix, epoch timing."""
        if not self.is_main:
            return
        self.log({"event": "epoch", **record})
        if self._wandb:
            self._accelerator.log(tracking.epoch_values(record, self._classes), step=record["step"])

    def finish(self, record: dict[str, Any] | None = None) -> None:
        """The `end` record (also the W&B summary), then close the trackers. Every rank calls this.

        Without a record (a stopped run) W&B is still closed, so what it logged is flushed to disk.
        """
        if self.is_main and record is not None:
            self.log({"event": "end", **record})
            if self._wandb:
                run = self._accelerator.get_tracker("wandb", unwrap=True)
                run.summary.update({f"run/{k}": v for k, v in record.items() if k != "weights_digest_per_rank"})
        if self._accelerator is not None:
            self._accelerator.end_training()

    def log(self, record: dict[str, Any]) -> None:
        """Append one JSON line and push it to disk, whole or not at all.

        The line goes out in one write on an O_APPEND descriptor; if the write fails or is short
        (a full disk), the file is cut back to where it was, so no half line is ever left for the
        next record to be glued onto, and the failure is a one-line DiskError.
        """
        if not self.is_main:
            return
        line = (json.dumps({"time": round(time.time(), 3), **record}) + "\n").encode()
        fd = os.open(self.metrics_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            try:
                written = os.write(fd, line)
                if written != len(line):
                    raise OSError(28, "No space left on device (short write)")
                os.fsync(fd)
            except OSError as exc:
                try:
                    os.ftruncate(fd, size)
                except OSError:
                    pass
                raise DiskError(f"cannot write {self.metrics_path}: {exc.strerror or exc}") from exc
        finally:
            os.close(fd)

    def repair_metrics(self) -> None:
        """Drop a torn last line (a run killed mid-write before lines were written whole), with a warning."""
        path = self.metrics_path
        if not path.is_file():
            return
        data = path.read_bytes()
        if not data or data.endswith(b"\n"):
            return
        keep = data.rfind(b"\n") + 1
        with open(path, "r+b") as fh:
            fh.truncate(keep)
        self.print(f"warning: {path}: dropped a torn last line ({len(data) - keep} bytes) left by an interrupted write")

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
