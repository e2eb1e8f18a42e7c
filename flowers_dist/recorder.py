"""Everything only the main process does, through one object: the run folder's files, the record's sinks, the console, the clock.

Every rank holds a Recorder and calls it the same way; on the other ranks each call does
nothing (except `finish`, which every rank must reach). This keeps `if is_main` out of the
training loop. The Recorder only dispatches: records go to the sinks (sinks.py: metrics.jsonl
through metrics_log, W&B), lines and the progress bar to the Console, run time to the RunClock.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from . import metrics_log, resume_check, tracking
from .artifacts import Landed
from .config import Config, TrackingConfig, dump
from .console import Console
from .run_clock import RunClock
from .sinks import Media, Record, Sink, SinkContext, for_run


class Recorder:
    """The one object for what only the main process does; it holds its parts and passes each call on.

    The positional arguments choose the default parts (the sinks of sinks.SINKS that this run has, a
    Console, a RunClock); `sinks`, `console` and `clock` may be given instead. `accelerator` feeds the
    W&B sink and closes the trackers in `finish`, on every rank.
    """

    def __init__(
        self,
        run_dir: Path,
        is_main: bool,
        progress: str,
        accelerator=None,
        tracking_cfg: TrackingConfig | None = None,
        wandb_mode: str = "disabled",
        *,
        sinks: Sequence[Sink] | None = None,
        console: Console | None = None,
        clock: RunClock | None = None,
    ):
        self.run_dir = Path(run_dir)
        self.is_main = is_main
        self.console = console or Console(is_main, progress)
        self.clock = clock or RunClock()
        self._accelerator = accelerator
        if not is_main:
            sinks = ()  # only the main process records
        elif sinks is None:
            sinks = for_run(SinkContext(self.run_dir, accelerator, tracking_cfg, wandb_mode, self.console.print))
        self.sinks: list[Sink] = list(sinks)
        # After a resume that trains again steps a tracker has seen, rows are logged past them as `wandb_step`;
        # metrics.jsonl keeps both numbers, and the next resume reads them back (tracking.step_offset).
        self._tracker_offset = 0
        self._last_step = 0  # the tracker step of the last step or epoch row: pictures join that row

    # -- clock ------------------------------------------------------------------------------
    @property
    def started(self) -> float:
        """perf_counter() at the run's start, moved back by the run time before a resume."""
        return self.clock.started

    def continue_clock(self, elapsed: float) -> None:
        """After a resume, count run time on from where the checkpoint left it (training time, not wall time between)."""
        self.clock.continue_from(elapsed)

    def elapsed(self) -> float:
        return self.clock.elapsed()

    # -- run folder -------------------------------------------------------------------------
    @property
    def metrics_path(self) -> Path:
        return metrics_log.path_of(self.run_dir)

    def start(
        self,
        cfg: Config,
        classes: Iterable[str],
        env: dict[str, Any],
        start_epoch: int,
        resumed: bool,
        start_step: int = 0,
        global_step: int = 0,
        resume_note: dict[str, Any] | None = None,
    ) -> None:
        """start_step: the step in start_epoch to continue from; global_step: optimizer steps already taken;
        resume_note: the resume's overrides, changed keys and --force."""
        if not self.is_main:
            return
        classes = list(classes)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.repair_metrics()
        if resumed:  # config.yaml keeps what the run was started with; each resume adds a line beside it
            note = resume_note or {"overrides": [], "changed": {}, "forced": False}
            resume_check.record(
                self.run_dir, note["overrides"], note["changed"], note["forced"], start_epoch, env["world_size"]
            )
            self._tracker_offset = tracking.step_offset(metrics_log.read(self.metrics_path), global_step)
        else:
            dump(cfg, self.run_dir / "config.yaml")
        (self.run_dir / "classes.json").write_text(json.dumps(classes, indent=1) + "\n")
        (self.run_dir / "environment.json").write_text(json.dumps(env, indent=1) + "\n")
        for sink in self.sinks:
            sink.start(cfg, classes, env)
        # A killed run can have logged an epoch whose checkpoint never landed; it is trained again
        # after a resume, and readers keep the last record of each epoch (metrics_log.latest_per).
        self.log(
            {
                "event": "resume" if resumed else "start",
                "from_epoch": start_epoch,
                "from_step": start_step,
                "world_size": env["world_size"],
                "devices": env["devices"],
            }
        )

    # -- records ----------------------------------------------------------------------------
    def log_step(self, record: dict[str, Any]) -> None:
        """One `step` row: training loss, learning rate and throughput over the last log interval."""
        if self.is_main:
            record = {"event": "step", **self._on_tracker_axis(record)}
            for sink in self.sinks:
                sink.log_step(record)

    def log_epoch(self, record: dict[str, Any]) -> None:
        """One `epoch` row: train/val accuracy, per-class accuracy, the confusion matrix, epoch timing."""
        if self.is_main:
            record = {"event": "epoch", **self._on_tracker_axis(record)}
            for sink in self.sinks:
                sink.log_epoch(record)

    def _on_tracker_axis(self, record: dict[str, Any]) -> dict[str, Any]:
        self._last_step = record["step"] + self._tracker_offset
        return {**record, "wandb_step": self._last_step} if self._tracker_offset else record

    def log_media(self, make: Callable[[bool], Media]) -> None:
        """Pictures (the val mistakes, the report's plots): `make` runs on the main process alone and writes their local
        copies into the run folder; its argument says whether a sink shows pictures (a tracker: W&B). Each sink then
        gets them at the last row's step."""
        if self.is_main:
            media = make(any(sink.shows_pictures for sink in self.sinks))
            for sink in self.sinks:
                sink.log_media(self._last_step, media)
            for line in media.notes:
                self.print(line)

    def checkpoint(self, paths: list[Path], facts: dict[str, Any]) -> None:
        """A checkpoint the background writer has put on disk (CheckpointManager.on_landed; on the writer thread): each
        sink may keep it (W&B as an artifact, per tracking.artifacts). `paths`: the step file first, then its other
        names; `facts`: the state's epoch, position, best, config and classes."""
        if self.is_main and self.sinks:
            landed = Landed.of(paths, facts)
            for sink in self.sinks:
                sink.log_checkpoint(landed)

    def log_data_check(self, record: dict[str, Any]) -> None:
        """The `data_check` row (files the check left out, and why); in W&B as summary values, which need no step."""
        if self.is_main:
            for sink in self.sinks:
                sink.log_data_check(record)

    def log(self, record: Record) -> None:
        """Any other record (it carries its own `event`): to metrics.jsonl, and to each sink that has a place for it.

        metrics.jsonl gets the line whole or not at all; a full disk is a one-line DiskError (metrics_log.append).
        """
        if self.is_main:
            for sink in self.sinks:
                sink.log_event(record)

    def finish(self, record: dict[str, Any] | None = None) -> None:
        """The `end` record (also the W&B summary), then close the trackers. Every rank calls this.

        Without a record (a stopped run) W&B is still closed, so what it logged is flushed to disk.
        """
        if self.is_main:
            end = None if record is None else {"event": "end", **record}
            for sink in self.sinks:
                sink.finish(end)
        if self._accelerator is not None:
            self._accelerator.end_training()  # on every rank: it also tears down the process group

    def repair_metrics(self) -> None:
        """Drop a torn last line (a run killed mid-write before lines were written whole), with a warning."""
        if not self.is_main:
            return
        dropped = metrics_log.repair(self.metrics_path)
        if dropped:
            self.print(
                f"warning: {self.metrics_path}: dropped a torn last line ({dropped} bytes) left by an interrupted write"
            )

    # -- console ----------------------------------------------------------------------------
    def print(self, message: str) -> None:
        self.console.print(message)

    def epoch_bar(self, total: int, epoch: int, epochs: int) -> Recorder:
        self.console.epoch_bar(total, epoch, epochs)
        return self

    def advance(self, steps: int, loss: float | None = None, images_per_s: float | None = None) -> None:
        self.console.advance(steps, loss, images_per_s)

    def close_bar(self) -> None:
        self.console.close_bar()
