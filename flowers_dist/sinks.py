"""Where the run's records go: metrics.jsonl and W&B, each a sink behind one small interface.

The Recorder hands every sink the same records (each with its `event`); a sink takes what it
has a place for. Another destination (TensorBoard, a CSV, a test's list) is one more class with
these methods and a `for_run`, added to SINKS; the Recorder does not change.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from . import artifacts, metrics_log, tracking
from .artifacts import Landed
from .config import Config, TrackingConfig

Record = dict[str, Any]


@dataclass(frozen=True)
class Picture:
    """An image for a tracker: its encoded bytes (JPEG or PNG) and a caption."""

    data: bytes
    caption: str = ""


@dataclass(frozen=True)
class Table:
    """Rows under named columns; a cell is a plain value (str, number) or a Picture."""

    columns: tuple[str, ...]
    rows: tuple[tuple[Any, ...], ...]


@dataclass(frozen=True)
class Media:
    """Pictures at the end of a run (or of an eval): tables and images by tracker key, and lines for the console."""

    tables: dict[str, Table] = field(default_factory=dict)
    images: dict[str, Picture] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def __or__(self, other: Media) -> Media:
        return Media({**self.tables, **other.tables}, {**self.images, **other.images}, self.notes + other.notes)


class Sink(Protocol):
    """One destination of the run's record; only the main process has sinks."""

    shows_pictures: bool
    """Whether log_media puts pictures where a person sees them: the report's plots are drawn only for such a sink."""

    def start(self, cfg: Config, classes: list[str], env: dict[str, Any]) -> None:
        """The run (or this attempt of it) begins: the resolved config, the class names, environment.json's facts."""

    def log_step(self, record: Record) -> None:
        """A `step` record: loss, learning rate and throughput over the last log interval."""

    def log_epoch(self, record: Record) -> None:
        """An `epoch` record: accuracies, per-class accuracy, the confusion matrix, timing."""

    def log_data_check(self, record: Record) -> None:
        """The `data_check` record: the files the check left out, and why."""

    def log_event(self, record: Record) -> None:
        """Any other record (`start`, `resume`, `stopped`, ...)."""

    def log_media(self, step: int, media: Media) -> None:
        """Tables and images (the val mistakes, the report's plots) at tracker step `step`, the last one logged."""

    def log_checkpoint(self, landed: Landed) -> None:
        """A checkpoint now on disk; called on the checkpoint writer's thread, while the loop goes on."""

    def finish(self, record: Record | None) -> None:
        """The `end` record of a finished run, or None for a stopped one; the Recorder closes the trackers after."""


@dataclass(frozen=True)
class SinkContext:
    """What a sink may need to decide whether it is on and to set itself up."""

    run_dir: Path
    accelerator: Any = None
    tracking_cfg: TrackingConfig | None = None
    wandb_mode: str = "disabled"
    say: Callable[[str], None] = print  # a line for the person watching (the Console's print)


class JsonlSink:
    """metrics.jsonl: every record, one whole line each (metrics_log), the record a killed run keeps."""

    shows_pictures = False

    def __init__(self, path: Path):
        self.path = path

    @classmethod
    def for_run(cls, ctx: SinkContext) -> JsonlSink:
        return cls(metrics_log.path_of(ctx.run_dir))

    def start(self, cfg: Config, classes: list[str], env: dict[str, Any]) -> None:
        pass  # config.yaml, classes.json and environment.json are the run folder's, written by the Recorder

    def log_step(self, record: Record) -> None:
        metrics_log.append(self.path, record)

    log_epoch = log_data_check = log_event = log_step

    def log_media(self, step: int, media: Media) -> None:
        pass  # pictures have no line here: their local copies are the run folder's report/ (mistakes.py, report.py)

    def log_checkpoint(self, landed: Landed) -> None:
        pass  # the checkpoint files are the run folder's own; this file records what was trained

    def finish(self, record: Record | None) -> None:
        if record is not None:
            metrics_log.append(self.path, record)


class WandbSink:
    """W&B through Accelerate's tracker: the config once, step and epoch rows, the data check and the end as summary.

    Every row is logged with a step, the record's `wandb_step` (the optimizer step, moved past what
    an earlier attempt logged; see tracking.step_offset): W&B silently drops rows when calls with
    and without `step` are mixed, and rows at or below a step it has seen. Records at the same step
    merge into one row. Summary values need no step.
    """

    shows_pictures = True

    def __init__(
        self,
        accelerator,
        tracking_cfg: TrackingConfig,
        mode: str,
        run_dir: Path,
        say: Callable[[str], None],
    ):
        self._accelerator = accelerator
        self._cfg = tracking_cfg
        self._mode = mode
        self._run_dir = run_dir
        self._say = say
        self._classes: list[str] = []
        self._git_commit: str | None = None

    @classmethod
    def for_run(cls, ctx: SinkContext) -> WandbSink | None:
        if ctx.accelerator is None or ctx.tracking_cfg is None or ctx.wandb_mode == "disabled":
            return None
        return cls(ctx.accelerator, ctx.tracking_cfg, ctx.wandb_mode, ctx.run_dir, ctx.say)

    def _run(self):
        return self._accelerator.get_tracker("wandb", unwrap=True)

    def start(self, cfg: Config, classes: list[str], env: dict[str, Any]) -> None:
        self._classes = list(classes)
        self._git_commit = env.get("git_commit")
        kwargs = tracking.init_kwargs(self._cfg, self._mode, self._run_dir)
        self._accelerator.init_trackers(
            self._cfg.project, config=tracking.run_config(cfg, env, self._classes), init_kwargs=kwargs
        )
        if self._mode == "offline":
            self._say(
                f"W&B is offline (no credentials, or asked for); upload later with: wandb sync {Path(self._run().dir).parent}"
            )

    def log_step(self, record: Record) -> None:
        self._accelerator.log(tracking.step_values(record), step=record.get("wandb_step", record["step"]))

    def log_epoch(self, record: Record) -> None:
        self._accelerator.log(
            tracking.epoch_values(record, self._classes), step=record.get("wandb_step", record["step"])
        )

    def log_data_check(self, record: Record) -> None:
        self._run().summary.update(
            {
                "data/skipped": record["skipped"],
                **{f"data/skipped_{kind}": n for kind, n in record["skipped_by_kind"].items()},
            }
        )

    def log_event(self, record: Record) -> None:
        pass  # start, resume and stopped rows have no W&B chart; W&B keeps its own run start and end

    def log_media(self, step: int, media: Media) -> None:
        """At the step of the last row, so they merge into it: a lower step would be dropped, a step-less call too."""
        import wandb
        from PIL import Image

        def image(p: Picture):
            return wandb.Image(Image.open(io.BytesIO(p.data)), caption=p.caption or None)

        values: dict[str, Any] = {
            key: wandb.Table(
                columns=list(t.columns),
                data=[[image(c) if isinstance(c, Picture) else c for c in row] for row in t.rows],
            )
            for key, t in media.tables.items()
        }
        values.update({key: image(p) for key, p in media.images.items()})
        if values:
            self._accelerator.log(values, step=step)

    def log_checkpoint(self, landed: Landed) -> None:
        """Per tracking.artifacts (artifacts.py). A W&B failure is a warning: the checkpoint is on disk, training goes on.

        On the writer thread: the run waits for it (CheckpointManager.wait) before it closes W&B, stopped or not."""
        for kind, uploaded in artifacts.to_log(landed, self._cfg.artifacts):
            try:
                artifact = artifacts.build(landed, kind, self._run().id, self._git_commit)
                self._run().log_artifact(artifact, aliases=artifacts.aliases(landed, uploaded))
            except Exception as exc:  # wandb raises many kinds; none should end a run whose checkpoint has landed
                self._say(f"warning: W&B did not take {landed.step_file.name} as a {kind} artifact: {exc}")

    def finish(self, record: Record | None) -> None:
        if record is not None:
            self._run().summary.update(
                {f"run/{k}": v for k, v in record.items() if k not in ("event", "weights_digest_per_rank")}
            )


class SinkKind(Protocol):
    """A sink class: it decides from the run's context whether it is on, and builds itself."""

    def for_run(self, ctx: SinkContext) -> Sink | None: ...


# The sinks of a run, in the order they receive each record: metrics.jsonl first, so that a record
# is on disk before a tracker that might fail sees it.
SINKS: tuple[SinkKind, ...] = (JsonlSink, WandbSink)


def for_run(ctx: SinkContext, kinds: Sequence[SinkKind] = SINKS) -> list[Sink]:
    """The sinks this run has: each kind decides from the context whether it is on."""
    return [sink for kind in kinds if (sink := kind.for_run(ctx)) is not None]
