"""The training loop: the one place where distribution and precision are handled.

`train()` builds the run's parts (parts.py, as bench and the GPU check build theirs), claims its
folder and resumes, then hands everything once to a `Trainer`, whose phases read as the run:
per epoch `train_epoch` and `end_epoch` (evaluation, record, checkpoint), then `finish`. The
work of one optimizer step is steps.optimizer_step, the same function `bench train` times. What
a checkpoint holds, when it is written and which one a resume reads belong to the
CheckpointManager (checkpointing.py); everything only the main process does goes through the
Recorder (recorder.py).

A stop signal (SIGUSR1/SIGTERM) reaches some ranks or all; every `train.stop_check_every`
steps the ranks agree in one small all-reduce, finish the step, checkpoint the position
inside the epoch and exit with EXIT_PREEMPTED. A resume continues from that very step.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object, is_compiled_module

from . import checkpoint_file, errors, mistakes, resume_check
from .checkpointing import CheckpointManager, Claim, Position, Progress, default_run_name
from .config import Config, ConfigError
from .data.audit import write_samples
from .data.resolution import train_size
from .distributed import num_nodes
from .environment import environment
from .errors import DiskError, HungError, PreemptedError
from .evaluate import EvalResult, local_counts
from .parts import CheckedData, Parts, batch_layout, build_parts, checked_data, learning_rate, run_accelerator
from .preemption import StopSignals
from .recorder import Recorder
from .steps import CORRECT, COUNT, LOSS_SUM, THIS_ATTEMPT, LoaderClock, optimizer_step, sync, weights_digest
from .tracking import resolve_mode
from .watchdog import Watchdog


def train(
    cfg: Config, config_name: str = "run", resume: Path | None = None, overrides: list[str] = (), force: bool = False
) -> Path:
    """Train (or resume) one run; returns its run folder. Every process calls this.

    A resume refuses config changes that change what the run computes unless `force`
    (resume_check.py); `overrides` are the command line's, recorded with each resume.
    """
    with StopSignals() as signals:  # from the start: a signal during set-up stops the run at its first check
        trainer = setup(cfg, config_name, resume, signals, list(overrides), force)
        try:
            with trainer.dog, _peer_failures(trainer.accelerator.process_index, cfg.train.collective_timeout):
                trainer.fit()
        finally:
            trainer.ckpt.close()
    return trainer.ckpt.run_dir


# -- set-up -------------------------------------------------------------------------------------
def setup(
    cfg: Config,
    config_name: str,
    resume: Path | None,
    signals: StopSignals,
    overrides: list[str] = (),
    force: bool = False,
) -> Trainer:
    """The parts every entry point builds, plus what only a run has: its folder, its record and its resume."""
    wandb_mode = resolve_mode(cfg.tracking)
    accelerator = run_accelerator(cfg, log_with=None if wandb_mode == "disabled" else "wandb")
    data = checked_data(cfg, accelerator)
    # Before the folder is claimed: a global batch that does not split over the processes leaves no run folder.
    layout = batch_layout(cfg.train, accelerator.num_processes, len(data.train))
    ckpt, claim = claim_run_folder(accelerator, cfg, config_name, resume)
    progress, resume_changes = Progress(), {}
    try:
        rec = Recorder(
            ckpt.run_dir, accelerator.is_main_process, cfg.train.progress, accelerator, cfg.tracking, wandb_mode
        )

        def load(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ema=None) -> str | None:
            nonlocal progress, resume_changes
            progress, resume_changes = restore(
                cfg, Path(claim.resume_from), ckpt, data.classes, model, optimizer, accelerator, force, ema
            )
            rec.continue_clock(progress.elapsed)
            return progress.loader_state

        parts = build_parts(cfg, accelerator, data, layout, load if claim.resume_from is not None else None)
    except BaseException:
        ckpt.close()
        raise
    resume_note = {"overrides": overrides, "changed": resume_changes, "forced": force} if claim.resume_from else None
    _record_start(cfg, accelerator, data, parts, rec, ckpt, claim, progress.position, resume_note)
    if progress.note:
        rec.print(progress.note)
    return Trainer(
        cfg=cfg,
        accelerator=accelerator,
        parts=parts,
        classes=data.classes,
        rec=rec,
        ckpt=ckpt,
        signals=signals,
        progress=progress,
    )


def _record_start(
    cfg: Config,
    accelerator: Accelerator,
    data: CheckedData,
    parts: Parts,
    rec: Recorder,
    ckpt: CheckpointManager,
    claim: Claim,
    pos: Position,
    resume_note: dict | None,
) -> None:
    """The run's start in its record (run files, the start event, the data check) and its one-line summary."""
    layout, world = parts.layout, accelerator.num_processes
    env = {**environment(world, num_nodes(accelerator), accelerator.device), **parts.choices()}
    rec.start(
        cfg,
        data.classes,
        env,
        pos.epoch,
        resumed=claim.resume_from is not None,
        start_step=pos.step,
        global_step=pos.epoch * layout.steps_per_epoch + pos.step,
        resume_note=resume_note,
    )
    rec.log_data_check(data.skipped.record())
    rec.print(data.skipped.line())
    for note in claim.notes:
        rec.print(f"warning: {note}")
    rec.print(
        f"run {ckpt.run_dir}: {len(data.train)} train / {len(data.val)} val images, {len(data.classes)} classes, "
        f"{world} process(es) on {accelerator.device.type}, global batch {layout.global_batch} = "
        f"{layout.micro_batch} x {world} process(es) x {layout.accum} accumulation step(s), "
        f"{layout.steps_per_epoch} steps/epoch, precision {cfg.train.mixed_precision}, "
        f"{parts.train_loader.kind} loader, sync_bn {'on' if parts.sync_bn else 'off'} ({parts.sync_bn_why})"
        + (
            f", torch.compile ({accelerator.state.dynamo_plugin.backend.value.lower()})"
            if is_compiled_module(parts.model)
            else ""
        )
        + ("; levers " + ", ".join(f"{k}={v}" for k, v in parts.levers.items()) if parts.levers else "")
        + (
            f"; resumed from {Path(claim.resume_from).name} at epoch {pos.epoch + 1} step {pos.step}"
            if claim.resume_from
            else ""
        )
    )


def restore(
    cfg: Config,
    path: Path,
    ckpt: CheckpointManager,
    classes: list[str],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    accelerator: Accelerator,
    force: bool,
    ema=None,
) -> tuple[Progress, dict]:
    """Load a checkpoint into the (not yet prepared) model and optimizer.

    Returns where to continue and the config keys the resume changes; refuses other classes, a change that
    alters the result (unless forced) and, forced, a model the checkpoint does not fit, each in one line.
    """
    state = checkpoint_file.load(path)
    if state["classes"] != classes:
        raise ConfigError(
            f"the classes in {cfg.data.root} differ from those the run was trained on ({state['classes']})"
        )
    changes = resume_check.check(state["config"], cfg.to_dict(), force)
    try:
        progress = ckpt.restore(
            state,
            model,
            optimizer,
            accelerator.process_index,
            accelerator.num_processes,
            scaler=accelerator.scaler,
            ema=ema,
        )
    except (RuntimeError, ValueError) as exc:  # only with --force: a model or optimizer (groups) it does not fit
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]  # torch's: a title, then the misfits
        raise errors.CheckpointError(
            f"{path} does not fit this config (model.name={cfg.model.name}): {(lines[1:] or lines or ['?'])[0][:200]}"
        ) from None
    return progress, changes


def claim_run_folder(
    accelerator: Accelerator, cfg: Config, config_name: str, resume: Path | None
) -> tuple[CheckpointManager, Claim]:
    """The main process claims the folder (lock, start or resume); every rank learns the outcome, errors included."""
    manager = None
    if accelerator.is_main_process:
        try:
            claim, manager = CheckpointManager.claim(
                cfg.train.output_dir,
                cfg.train.name or default_run_name(config_name),
                cfg.train.resume,
                resume,
                cfg.train,
            )
        except errors.USER_ERRORS as exc:
            claim = Claim("", error=(type(exc).__name__, str(exc)))
        box = [claim]
    else:
        box = [None]
    broadcast_object_list(box)  # the other ranks would otherwise wait here for a folder that never comes
    claim = box[0]
    if claim.error is not None:
        raise getattr(errors, claim.error[0])(claim.error[1])
    return manager or CheckpointManager(Path(claim.run_dir), cfg.train, is_main=False), claim


class _Stopped(Exception):
    """The ranks agreed to stop (a signal); the checkpoint of the position is written."""

    def __init__(self, signal_name: str, position: Position):
        super().__init__(signal_name)
        self.signal_name, self.position = signal_name, position


# -- the run ------------------------------------------------------------------------------------
class Trainer:
    """One run's phases, over the parts it receives once."""

    def __init__(
        self,
        *,
        cfg: Config,
        accelerator: Accelerator,
        parts: Parts,
        classes: list[str],
        rec: Recorder,
        ckpt: CheckpointManager,
        signals: StopSignals,
        progress: Progress,
    ):
        self.cfg, self.accelerator, self.parts, self.classes = cfg, accelerator, parts, classes
        self.rec, self.ckpt, self.signals, self.progress = rec, ckpt, signals, progress
        ckpt.on_landed = rec.checkpoint  # each checkpoint, once on disk, to the sinks (W&B artifacts)
        self.layout = parts.layout
        self.dog = Watchdog(cfg.train.watchdog, accelerator.process_index)
        # The model itself, without DDP's or torch.compile's wrapper: a compiled module's
        # state_dict prefixes every key with `_orig_mod.`, which eval, predict and resume
        # would not recognise. (Accelerate compiles when model.compile or its own dynamo setting asks.)
        self.bare = accelerator.unwrap_model(parts.model, keep_torch_compile=False)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def lr(self, epoch: int, step: int) -> float:
        """The learning rate of optimizer step `step` (0-based) of `epoch`."""
        return learning_rate(self.cfg, self.layout, epoch, step)

    def fit(self) -> None:
        """Every epoch from where the run stands; a stop the ranks agreed on ends it with EXIT_PREEMPTED."""
        epochs, start = self.cfg.train.epochs, self.progress.position.epoch
        if start >= epochs:
            self.rec.print(f"run already complete ({start} of {epochs} epochs); raise train.epochs to continue")
            self.rec.finish()
            return
        try:
            for epoch in range(start, epochs):
                sums, train_time = self.train_epoch(epoch)
                self.end_epoch(epoch, sums, train_time)
        except _Stopped as stop:
            self.stop(stop)
        self.finish()

    # -- one epoch of training ------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> tuple[torch.Tensor, float]:
        """Train one epoch (or its rest, after a mid-epoch resume).

        Returns this rank's sums (LOSS_SUM, CORRECT, COUNT, THIS_ATTEMPT) and the training time.
        """
        cfg, layout, loader = self.cfg.train, self.layout, self.parts.train_loader
        steps, accum = layout.steps_per_epoch, layout.accum
        pos = self.progress.position
        skip = pos.step if pos.epoch == epoch else 0
        loader.set_epoch(epoch, skip * accum)  # the loader counts micro-batches
        self.parts.model.train()
        self.parts.optimizer.zero_grad(set_to_none=True)
        # Running sums stay on the device; reading them back is a sync, so it happens only every log_every steps.
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        if skip and self.progress.epoch_sums is not None:
            sums += torch.tensor(self.progress.epoch_sums, dtype=torch.float64, device=self.device)
        restored = sums.clone()
        clock = LoaderClock(self.device)
        window = _Window(self.rec, epoch, steps, layout.global_batch, self.accelerator.num_processes, skip, sums)
        self.rec.epoch_bar(steps, epoch, cfg.epochs)
        self.rec.advance(skip)
        batches = iter(loader)
        epoch_start = time.perf_counter()
        for step in range(skip + 1, steps + 1):  # 1-based optimizer step in the epoch
            lr = self.lr(epoch, step - 1)
            optimizer_step(
                self.parts.model,
                self.parts.optimizer,
                batches,
                accum=accum,
                lr=lr,
                sums=sums,
                backward=self.accelerator.backward,
                no_sync=self.accelerator.no_sync,
                clock=clock,
                beat=self.dog.beat,
                label_smoothing=self.cfg.optim.label_smoothing,
                ema=self.parts.ema,
                mixup=self.parts.mixup,
            )
            self.ckpt.check()  # a failed background write (full disk) is reported at once
            if step % cfg.log_every == 0 or step == steps:
                window.log(step, lr, sums, clock, self.device)
            global_step = epoch * steps + step
            if step < steps and (global_step % cfg.stop_check_every == 0 or self.ckpt.periodic_due(global_step)):
                stop, time_due = agree(self.signals, self.ckpt, self.accelerator)
                if stop or time_due or self.ckpt.periodic_due(global_step):
                    self.save(Position(epoch, step), sums)
                if stop:
                    self.record_samples(epoch, skip)
                    raise _Stopped(self.signals.received or "a peer's signal", Position(epoch, step))
        if next(batches, None) is not None:  # also lets the loader finish its epoch (DALI reads its tail)
            raise RuntimeError(f"the loader yields more than {steps} x {accum} micro-batches an epoch")
        self.record_samples(epoch, skip)
        sync(self.device)
        self.rec.close_bar()
        return torch.cat([sums, (sums - restored)[COUNT:]]), time.perf_counter() - epoch_start

    def record_samples(self, epoch: int, first_step: int) -> None:
        """train.record_samples: this process writes the samples it trained in this epoch from `first_step` on."""
        if self.cfg.train.record_samples:
            names = self.parts.train_loader.trained()
            write_samples(self.ckpt.run_dir, epoch, self.accelerator.process_index, first_step, names)

    def save(self, position: Position, sums: torch.Tensor, is_best: bool = False) -> None:
        """Every rank: gather the per-rank parts (a collective), then the main process writes in the background."""
        if self.parts.ema is not None:  # each rank averaged its own BatchNorm statistics in: save their mean
            average_buffers(self.parts.ema.module, self.accelerator)
        rank_sums = gather_object([sums[: COUNT + 1].tolist()])
        loader_states = gather_object([self.parts.train_loader.resume_state()])
        self.progress.elapsed = self.rec.elapsed()
        progress = Progress(position, self.progress.best, self.progress.elapsed)
        state = self.ckpt.state(
            model=self.bare,
            optimizer=self.parts.optimizer,
            progress=progress,
            rank_sums=rank_sums,
            loader_states=loader_states,
            world=self.accelerator.num_processes,
            config=self.cfg.to_dict(),
            classes=self.classes,
            scaler=self.accelerator.scaler,
            ema=self.parts.ema,
        )
        self.ckpt.save(state, position.epoch * self.layout.steps_per_epoch + position.step, is_best)

    def stop(self, stop: _Stopped) -> None:
        """After the stop checkpoint was started: let it land, record the stop, close W&B, and leave with EXIT_PREEMPTED."""
        with self.dog.pause():
            self.ckpt.wait()
            # No rank leaves before the checkpoint has landed: under srun --kill-on-bad-exit a rank that
            # exits first gets its launcher to fail, and SLURM then signals the main node's task mid-write.
            self.accelerator.wait_for_everyone()
            pos = stop.position
            self.rec.close_bar()
            self.rec.log(
                {
                    "event": "stopped",
                    "signal": stop.signal_name,
                    "epoch": pos.epoch,
                    "step": pos.step,
                    "elapsed": self.progress.elapsed,
                }
            )
            self.rec.print(
                f"stopped by {stop.signal_name} at epoch {pos.epoch + 1} step {pos.step}; checkpoint written to "
                f"{self.ckpt.dir / 'last.pt'}; the same command (or --resume {self.ckpt.run_dir}) continues "
                f"(exit code {errors.EXIT_PREEMPTED})"
            )
            self.rec.finish()
        raise PreemptedError(
            f"stopped by {stop.signal_name}; resume to continue from epoch {pos.epoch + 1} step {pos.step}"
        )

    # -- end of an epoch: evaluation, record, checkpoint ----------------------------------------
    def end_epoch(self, epoch: int, sums: torch.Tensor, train_time: float) -> None:
        cfg = self.cfg
        totals = self.accelerator.reduce(sums, reduction="sum").cpu()
        val, eval_time = self.evaluate()
        val_ema = self.evaluate_ema()
        best = self.progress.best
        is_best = val.accuracy > best["val_acc"]
        if is_best:
            best.update(val_acc=val.accuracy, epoch=epoch)
        elapsed = self.rec.elapsed()
        if best["time_to_target"] is None and val.accuracy >= cfg.tracking.target_accuracy:
            best["time_to_target"] = elapsed
        seen = float(totals[COUNT])
        record = {
            "step": (epoch + 1) * self.layout.steps_per_epoch,
            "epoch": epoch,
            "lr": self.lr(epoch, 0),
            "train_loss": float(totals[LOSS_SUM]) / max(seen, 1),
            "train_acc": float(totals[CORRECT]) / max(seen, 1),
            "train_images": int(seen),
            "train_size": train_size(cfg.data, epoch),  # the crops' side (progressive resizing changes it)
            "val_loss": val.loss,
            "val_acc": val.accuracy,
            "val_count": val.count,
            "val_per_class": dict(zip(self.classes, val.per_class_accuracy())),
            "val_confusion": val.confusion,
            "images_per_s": float(totals[THIS_ATTEMPT])
            / max(train_time, 1e-9),  # images of this attempt, over its time
            "train_time": train_time,
            "epoch_time": train_time + eval_time,
            "elapsed": elapsed,
        }
        if val_ema is not None:
            record.update(val_loss_ema=val_ema.loss, val_acc_ema=val_ema.accuracy)
        self.rec.log_epoch(record)
        self.rec.print(
            f"epoch {epoch + 1:>3}/{cfg.train.epochs}  lr {record['lr']:.2e}  train loss {record['train_loss']:.4f} "
            f"acc {record['train_acc']:.4f}  val loss {val.loss:.4f} acc {val.accuracy:.4f}  "
            f"{record['images_per_s']:.1f} img/s  {record['epoch_time']:.1f}s"
            + (f"  ema val acc {val_ema.accuracy:.4f}" if val_ema is not None else "")
        )
        # Written in the background; the ranks stay in step through the next epoch's all-reduces.
        self.save(Position(epoch + 1, 0), torch.zeros(3, dtype=torch.float64), is_best)
        self.progress.position = Position(epoch + 1, 0)
        stop, _ = agree(
            self.signals, self.ckpt, self.accelerator
        )  # a signal during evaluation: this checkpoint is the stop's
        if stop and epoch + 1 < cfg.train.epochs:  # after the last epoch the run simply ends
            raise _Stopped(self.signals.received or "a peer's signal", Position(epoch + 1, 0))

    def evaluate(self) -> tuple[EvalResult, float]:
        """Exact validation accuracy of the current weights, and the time it took."""
        start = time.perf_counter()
        val = self._validate(self.bare, self.parts.eval_model)
        return val, time.perf_counter() - start

    def evaluate_ema(self) -> EvalResult | None:
        """model.ema: exact validation accuracy of the weight average (its BatchNorm statistics averaged over ranks)."""
        ema = self.parts.ema
        return None if ema is None else self._validate(ema.module, ema.module)

    def _validate(self, bare: torch.nn.Module, model: torch.nn.Module) -> EvalResult:
        """`model` (bare, or its compiled evaluation form) over the val split, after averaging bare's BatchNorm
        statistics over ranks; counts summed over ranks."""
        average_buffers(bare, self.accelerator)
        with self.accelerator.autocast():
            counts = local_counts(
                model,
                self.parts.val_loader,
                len(self.classes),
                self.device,
                on_batch=self.dog.beat,
                hflip_tta=self.cfg.train.eval_hflip_tta,
            )
        return EvalResult.from_counts(self.accelerator.reduce(counts, reduction="sum"), len(self.classes))

    def finish(self) -> None:
        # Replicas must hold identical weights; a mismatch means the processes did not train as one.
        digests = gather_object([weights_digest(self.bare)])
        if len(set(digests)) > 1:
            self.rec.print(f"warning: processes ended with different weights: {digests}")
        best = self.progress.best
        with self.dog.pause():
            self.ckpt.wait()  # the last checkpoint is on disk before the run says it has ended
            self.rec.print(
                f"best val accuracy {best['val_acc']:.4f} at epoch {best['epoch'] + 1}; run folder {self.ckpt.run_dir}"
            )
            split = self.parts.val_loader.split  # pictures of the final weights: the report's plots, the val mistakes
            self.rec.log_media(
                lambda plots: mistakes.of_run(self.cfg, self.ckpt.run_dir, self.bare, split, self.accelerator, plots)
            )
            # The other ranks wait for the main process's pass: the process group is torn down by all at once.
            self.accelerator.wait_for_everyone()
            self.rec.finish(
                {
                    "best_val_acc": best["val_acc"],
                    "best_epoch": best["epoch"],
                    "total_time": self.rec.elapsed(),
                    "target_accuracy": self.cfg.tracking.target_accuracy,
                    "time_to_target": best["time_to_target"],
                    "weights_digest_per_rank": digests,
                }
            )


class _Window:
    """The `step` rows: loss and throughput over each log interval, read back from the device once per interval."""

    def __init__(
        self, rec: Recorder, epoch: int, steps: int, global_batch: int, world: int, first_step: int, sums: torch.Tensor
    ):
        self.rec, self.epoch, self.steps, self.global_batch, self.world = rec, epoch, steps, global_batch, world
        self.logged = sums.clone()
        self.last = time.perf_counter()
        self.last_step = first_step
        self.waited = 0.0  # the loader clock's reading at the last log

    def log(self, step: int, lr: float, sums: torch.Tensor, clock: LoaderClock, device: torch.device) -> None:
        # On CUDA the host runs ahead of the device, so a clock read without a sync times kernel
        # launches, not work. Syncing every step would stall the queue; once per interval makes the
        # interval's wall time honest at a negligible cost.
        sync(device)
        now = time.perf_counter()
        done = step - self.last_step
        interval = max(now - self.last, 1e-9)
        loss_sum, _, count = (sums - self.logged).tolist()  # this rank's, since the last log
        images_per_s = done * self.global_batch / interval
        window_loss = loss_sum / max(count, 1)
        self.rec.advance(done, window_loss, images_per_s)
        self.rec.log_step(
            {
                "step": self.epoch * self.steps + step,
                "epoch": self.epoch,
                "lr": lr,
                "loss": window_loss,
                "images_per_s": images_per_s,
                "images_per_s_per_process": images_per_s / self.world,
                "step_time": interval / done,
                "data_wait_fraction": min((clock.waited - self.waited) / interval, 1.0),
                "elapsed": now - self.rec.started,
            }
        )
        self.last, self.last_step, self.logged, self.waited = now, step, sums.clone(), clock.waited


def agree(signals: StopSignals, ckpt: CheckpointManager, accelerator: Accelerator) -> tuple[bool, bool]:
    """One small all-reduce: has any rank seen a stop signal; is a time-based checkpoint due by the main process's clock."""
    ckpt.heartbeat()
    flags = torch.tensor(
        [float(signals.requested), float(accelerator.is_main_process and ckpt.time_due())], device=accelerator.device
    )
    if accelerator.num_processes > 1:
        flags = accelerator.reduce(flags, reduction="sum")
    stop, due = flags.tolist()
    return stop > 0, due > 0


def average_buffers(model: torch.nn.Module, accelerator: Accelerator) -> None:
    """Make every rank's BatchNorm statistics the mean over ranks (before evaluating or saving).

    DDP broadcasts rank 0's buffers before each forward, but each rank's last forward updated them
    with its own batch; averaging them lets every rank evaluate, and save, the same model.
    """
    if accelerator.num_processes == 1:
        return
    for buffer in model.buffers():
        if buffer.is_floating_point():
            buffer.copy_(accelerator.reduce(buffer.detach().clone(), reduction="mean"))


# What gloo and NCCL say when a peer stops answering or dies (seen: "Application timeout caused pair closure",
# "Timed out waiting ... for recv", "Connection closed by peer").
_PEER_FAILURE = re.compile(r"(?i)timed? ?out|timeout|connection (closed|reset)|broken pipe|pair closure")


class _peer_failures:
    """A collective that timed out or lost its peer becomes a one-line HungError (exit code 69), not a traceback."""

    def __init__(self, rank: int, timeout: float):
        self.rank, self.timeout = rank, timeout

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if exc is None or not isinstance(exc, RuntimeError) or isinstance(exc, (DiskError, HungError, PreemptedError)):
            return False
        dist_error = getattr(torch.distributed, "DistError", ())
        if isinstance(exc, dist_error) or _PEER_FAILURE.search(str(exc)):
            first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
            raise HungError(
                f"rank {self.rank}: a collective failed; a peer rank is hung or dead "
                f"(train.collective_timeout={self.timeout:g} s): {first[:200]}"
            ) from None
        return False
