"""The checkpoint manager: which run folder a run owns, what goes into a checkpoint, when one is written, which one a resume reads.

One owner for the whole life of checkpoints (as torchtitan's CheckpointManager): the loop hands
it plain parts (model, optimizer, position, per-rank loader states) and asks it to save or to
restore; file format and integrity live in checkpoint_file.py, the folder lock in run_lock.py.

Files in `<run>/checkpoints/`: every save writes `step-<global step>.pt` once and gives it the
names `last.pt` (and `best.pt` after a best epoch) as hard links; the newest `train.keep_checkpoints`
step files are kept. A resume reads `last.pt`; if it does not verify, the newest step file that
does, then `best.pt`, and says so.
"""

from __future__ import annotations

import os
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from . import checkpoint_file
from .config import TrainConfig
from .data.contract import ReaderState, carried_state
from .errors import CheckpointError, ConfigError
from .run_lock import RunLock

STEP_FILE = re.compile(r"^step-(\d+)\.pt$")


def default_run_name(config_name: str) -> str:
    """Under SLURM the job's own name and id (a requeued job finds its folder again); elsewhere unique per launch."""
    job = os.environ.get("SLURM_JOB_ID")
    if job:
        array = os.environ.get("SLURM_ARRAY_JOB_ID")
        if array:
            job = f"{array}_{os.environ.get('SLURM_ARRAY_TASK_ID', '0')}"
        return f"{os.environ.get('SLURM_JOB_NAME', config_name)}-{job}".replace("/", "_")
    # Seconds alone collide when two runs start together; the random tag does not.
    return f"{config_name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


@dataclass
class Position:
    """Where training stands: the next step to run is `step` (0-based) of `epoch`."""

    epoch: int = 0
    step: int = 0


@dataclass
class Progress:
    """Everything besides weights that a run must carry over a stop to continue exactly."""

    position: Position = field(default_factory=Position)
    best: dict[str, Any] = field(default_factory=lambda: {"val_acc": -1.0, "epoch": -1, "time_to_target": None})
    elapsed: float = 0.0
    """Training time so far (the clock continues after a resume)."""
    epoch_sums: list[float] | None = None
    """This rank's running (loss x n, correct, n) of the unfinished epoch, for a mid-epoch resume."""
    loader_state: ReaderState | str | None = None
    """This rank's loader state at `position` (contract.carried_state: its DALI reader, or the epoch's trained samples)."""
    note: str | None = None
    """How this resume differs from an uninterrupted run, in one line for its start (None: it resumes exactly)."""


@dataclass
class Claim:
    """The main process's decision about the run folder, broadcast to every rank."""

    run_dir: str
    resume_from: str | None = None
    notes: list[str] = field(default_factory=list)
    error: tuple[str, str] | None = None  # (error class name, one-line message), raised on every rank


def world_change_note(saved_world: int, world: int, pos: Position, carried: ReaderState | str | None) -> str:
    """The one line a mid-epoch resume at another world size of a run saved with DALI's reader states starts with.

    Only DALI's full-epoch reader saves a state, per rank, over its own shard of the data: it cannot
    be dealt to another number of ranks. With the samples each rank trained (`carried`), the rest
    of the epoch is exactly the samples not yet trained (`contract.rest_of_epoch`); a checkpoint
    of an older format named none, and its epoch restarts in DALI's order. The PyTorch loader's
    order is a function of (seed, epoch) and the world size, so its resumes are exact anywhere.
    """
    where = f"resumed on {world} process(es) from a {saved_world}-process DALI checkpoint at epoch {pos.epoch + 1} "
    if isinstance(carried, dict):
        return (
            f"note: {where}step {pos.step}: the {len(carried['trained'])} samples its ranks trained are not trained "
            f"again; the rest of epoch {pos.epoch + 1} follows the global order at this world size (no sample repeats "
            "or is skipped; batches and augmentation draws differ from an uninterrupted run's); DALI's reader takes "
            f"over at epoch {pos.epoch + 2}"
        )
    return (
        f"warning: {where}step {pos.step}: DALI's reader restarts the epoch's order; samples of epoch {pos.epoch + 1} "
        "may repeat or be skipped (the checkpoint names no trained samples; exact with data.loader=torch)"
    )


class CheckpointManager:
    """Every rank holds one and calls it the same way; only the main process touches the disk."""

    def __init__(self, run_dir: Path, cfg: TrainConfig, is_main: bool):
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / "checkpoints"
        self.cfg = cfg
        self.is_main = is_main
        self.writer = checkpoint_file.BackgroundWriter()
        self.lock = RunLock(self.run_dir, stale_after=max(600.0, 2 * cfg.watchdog))
        self._last_save = time.monotonic()
        # Told on the writer thread once a save is on disk: (its paths, the step file first; the state's small fields).
        # The Recorder logs it as a W&B artifact then, so a run stopped later already has it there.
        self.on_landed: Callable[[list[Path], dict[str, Any]], None] | None = None

    # -- the run folder ----------------------------------------------------------------------
    @staticmethod
    def claim(
        output_dir: str, name: str, mode: str, explicit: Path | None, cfg: TrainConfig
    ) -> tuple[Claim, CheckpointManager]:
        """Main process: take the folder's lock and decide between a fresh start and a resume (see train.resume)."""
        run_dir = explicit if explicit is not None else Path(output_dir) / name
        manager = CheckpointManager(run_dir, cfg, is_main=True)
        claim = Claim(str(run_dir))
        existed = run_dir.is_dir() and any(run_dir.iterdir())
        if explicit is not None and not existed:
            raise ConfigError(f"--resume {run_dir}: no such run folder")
        if mode == "never" and explicit is None and existed:
            raise ConfigError(
                f"run folder {run_dir} already exists and train.resume=never; choose another train.name "
                f"or resume it (train.resume=auto)"
            )
        run_dir.mkdir(parents=True, exist_ok=True)
        note = manager.lock.acquire()
        if note:
            claim.notes.append(note)
        try:
            chosen, notes = manager.newest_valid()
            claim.notes += notes
            if chosen is not None:
                claim.resume_from = str(chosen)
            elif explicit is not None or notes:
                # Checkpoints exist but none verifies: starting over would silently drop the run's progress.
                why = "; ".join(notes) if notes else f"no checkpoint in {manager.dir}"
                raise CheckpointError(f"cannot resume {run_dir}: {why}")
            manager.clean_leftovers()
        except BaseException:
            manager.lock.release()
            raise
        return claim, manager

    def clean_leftovers(self) -> None:
        """Temporary files of writes cut short by a kill or a full disk."""
        if self.dir.is_dir():
            for stale in self.dir.glob(".*.tmp-*"):
                stale.unlink(missing_ok=True)

    def candidates(self) -> list[Path]:
        """Checkpoint files, newest first: last.pt, the step files by step, best.pt."""
        if not self.dir.is_dir():
            return []
        steps = sorted(
            (p for p in self.dir.iterdir() if STEP_FILE.match(p.name)),
            key=lambda p: int(STEP_FILE.match(p.name).group(1)),
            reverse=True,
        )
        return [p for p in [self.dir / "last.pt", *steps, self.dir / "best.pt"] if p.exists()]

    def newest_valid(self) -> tuple[Path | None, list[str]]:
        """The newest checkpoint that verifies, and a note for each newer one that did not."""
        notes = []
        for path in self.candidates():
            try:
                checkpoint_file.load(path)
            except CheckpointError as exc:
                notes.append(str(exc))
                continue
            if notes:
                notes.append(f"resuming from {path.name} instead")
            return path, notes
        return None, notes

    # -- what a checkpoint holds -------------------------------------------------------------
    def state(
        self,
        *,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        progress: Progress,
        rank_sums: list[list[float]],
        loader_states: list[str | None],
        world: int,
        config: dict[str, Any],
        classes: list[str],
        scaler: Any = None,
        ema: Any = None,
    ) -> dict[str, Any]:
        """The checkpoint of the run at `progress.position`; rank_sums and loader_states hold every rank's.

        `scaler`: fp16's GradScaler, whose loss scale a resume must continue from (a fresh one restarts
        at 65,536 and skips the first steps finding the scale again). `ema`: model.ema's ModelEmaV3, or None.
        """
        pos = progress.position
        return {
            "format": checkpoint_file.FORMAT,
            # The last completed epoch (-1 before the first), as eval, predict and reports read it.
            "epoch": pos.epoch - 1,
            "position": {"epoch": pos.epoch, "step": pos.step},
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "rng": checkpoint_file.rng_state(),
            "config": config,
            "classes": classes,
            "best": progress.best,
            "elapsed": progress.elapsed,
            "world_size": world,
            "loader_states": loader_states,
            "epoch_sums": rank_sums,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "ema": ema.module.state_dict() if ema is not None else None,
        }

    def restore(
        self,
        state: dict[str, Any],
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        rank: int,
        world: int,
        scaler: Any = None,
        ema: Any = None,
    ) -> Progress:
        """Load weights, optimizer, generators (and fp16's loss scale, model.ema's average); return where training
        continues.

        `state` is one that `state()` wrote (checkpoint_file.load has checked its header, digest and format).
        A checkpoint without an average (saved with model.ema off: resume_check let it through only forced)
        starts the average from its weights, and the resume says so."""
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        fresh_ema = ema is not None and state.get("ema") is None
        if fresh_ema:
            ema.set(model)
        elif ema is not None:
            ema.module.load_state_dict(state["ema"])
        if scaler is not None and state["scaler"] is not None:  # None: the run was saved without fp16
            scaler.load_state_dict(state["scaler"])
        checkpoint_file.set_rng_state(state["rng"])
        pos = state["position"]
        progress = Progress(Position(pos["epoch"], pos["step"]), dict(state["best"]), state["elapsed"])
        # Per-rank loader positions and sums only mean something for the same shards, i.e. the same world size.
        same_world = state["world_size"] == world
        loaders = state["loader_states"]
        if progress.position.step > 0 and any(s is not None for s in loaders):
            progress.loader_state = carried_state(loaders, state["world_size"], world, rank)
            if not same_world:
                progress.note = world_change_note(state["world_size"], world, progress.position, progress.loader_state)
        sums = state["epoch_sums"]
        if progress.position.step > 0 and sums:
            if same_world and len(sums) == world:
                progress.epoch_sums = sums[rank]
            else:  # the epoch's totals are what count: give them to rank 0
                progress.epoch_sums = [sum(col) for col in zip(*sums)] if rank == 0 else [0.0] * len(sums[0])
        if fresh_ema:
            fresh = "note: the checkpoint holds no weight average (model.ema); the average starts from its weights"
            progress.note = f"{progress.note}\n{fresh}" if progress.note else fresh
        return progress

    # -- when checkpoints are written --------------------------------------------------------
    def periodic_due(self, global_step: int) -> bool:
        """A step-based save at this step (every rank computes the same answer)."""
        every = self.cfg.checkpoint_every_steps
        return every > 0 and global_step % every == 0

    def time_due(self) -> bool:
        """A time-based save is due by this process's clock (the loop takes the main process's word for it)."""
        minutes = self.cfg.checkpoint_every_minutes
        return minutes > 0 and time.monotonic() - self._last_save >= minutes * 60

    def save(self, state: dict[str, Any], global_step: int, is_best: bool = False) -> None:
        """Write in the background (main process); the loop goes on at once."""
        self._last_save = time.monotonic()
        if not self.is_main:
            return
        paths = [self.dir / f"step-{global_step:08d}.pt", self.dir / "last.pt"]
        if is_best:
            paths.append(self.dir / "best.pt")
        after, told = self._prune, self.on_landed
        if told is not None:
            facts = {k: state[k] for k in ("epoch", "position", "config", "classes")} | {"best": dict(state["best"])}
            after = lambda: (self._prune(), told(paths, facts))  # noqa: E731
        self.writer.save(state, paths, after=after)

    def _prune(self) -> None:
        """Keep the newest train.keep_checkpoints step files (last.pt and best.pt are links of their own)."""
        steps = [p for p in self.candidates() if STEP_FILE.match(p.name)]
        for old in steps[max(1, self.cfg.keep_checkpoints) :]:
            old.unlink(missing_ok=True)

    def check(self) -> None:
        """Raise at once if a background write failed (a full disk); cheap enough for every step."""
        if self.is_main:
            self.writer.check()

    def wait(self) -> None:
        if self.is_main:
            self.writer.wait()

    def heartbeat(self) -> None:
        if self.is_main:
            self.lock.heartbeat()

    def close(self) -> None:
        """Wait for the last write, then give the folder up."""
        try:
            self.wait()
        finally:
            if self.is_main:
                self.lock.release()
