"""The training loop: the one place where distribution and precision are handled.

`train()` reads as the run's phases: `setup` (process group, run folder, model, loaders,
resume), then per epoch `train_epoch` and `end_epoch` (evaluation, record, checkpoint), then
`finish`. What a checkpoint holds, when it is written and which one a resume reads belong to
the CheckpointManager (checkpointing.py); everything only the main process does goes through
the Recorder (recorder.py).

A stop signal (SIGUSR1/SIGTERM) reaches some ranks or all; every `train.stop_check_every`
steps the ranks agree in one small all-reduce, finish the step, checkpoint the position
inside the epoch and exit with EXIT_PREEMPTED. A resume continues from that very step.
"""

from __future__ import annotations

import hashlib
import re
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object, is_compiled_module, set_seed

from . import checkpoint, errors, resume_check, sync_bn
from .checkpointing import CheckpointManager, Claim, Position, Progress, default_run_name
from .config import Config, ConfigError, OptimConfig, TrainConfig
from .data import BatchLoader, build_loader
from .data.usable import shared, usable_splits
from .distributed import make_accelerator, num_nodes, placement
from .errors import DiskError, HungError, PreemptedError
from .evaluate import EvalResult, local_counts
from .model import build_model
from .preemption import StopSignals
from .recorder import Recorder, environment
from .schedule import lr_at_step
from .tracking import resolve_mode
from .watchdog import Watchdog

# Layout of the per-rank running sums, one float64 device tensor so that one reduce sums them all.
LOSS_SUM, CORRECT, COUNT = 0, 1, 2


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 over every parameter and buffer, in state-dict order."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def sync(device: torch.device) -> None:
    """Wait for the device: on CUDA the host runs ahead, so a clock read without this times launches."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def batch_per_process(cfg: TrainConfig, world: int) -> int:
    """Each process's micro-batch (TrainConfig.batch_split); the global batch, and so the recipe, stays the same at any world size."""
    return cfg.batch_split(world)[0]


def build_optimizer(cfg: OptimConfig, model: torch.nn.Module, fused: bool = False) -> torch.optim.Optimizer:
    """SGD as the config sets it; the learning rate is overwritten before each step from schedule.lr_at_step.

    fused=True (pass it on CUDA) updates all parameters in one kernel, and is what keeps fp16
    free of a host sync: GradScaler.step() reads `found_inf` with .item() before a plain
    optimizer's step, but hands it, on the device, to an optimizer that sets
    _step_supports_amp_scaling (fused SGD does), whose kernel skips the update itself.
    """
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                                nesterov=cfg.nesterov, fused=fused or None)

    def keep_fused(opt: torch.optim.Optimizer) -> None:
        # load_state_dict restores each group's saved `fused`: a checkpoint from a CPU (unfused)
        # run resumed under fp16 on CUDA would hand the scaler's tensors to the unfused step,
        # which refuses them. The choice belongs to this process's device, not to the checkpoint.
        for group in opt.param_groups:
            group["fused"] = fused or None

    optimizer.register_load_state_dict_post_hook(keep_fused)
    return optimizer


def batch_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy as sum / n: the same value for n > 0, and 0 (with zero gradients) for a rank's
    empty batch (every file unreadable), where the mean would be NaN and poison every rank through the all-reduce."""
    return F.cross_entropy(logits.float(), labels, reduction="sum") / max(labels.numel(), 1)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor,
               backward=torch.Tensor.backward) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step (forward, loss, backward, update) of one micro-batch; `backward` is Accelerate's under DDP
    or mixed precision. The loop's micro_step does the forward and backward, so bench and gpu_check time its work."""
    optimizer.zero_grad(set_to_none=True)  # host-only (set_to_none): before the forward as well as after it
    logits, loss = micro_step(model, images, labels, backward, accum=1, syncs=True, no_sync=None)
    optimizer.step()
    return logits, loss


def micro_step(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, backward, accum: int,
               syncs: bool, no_sync) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward of one of the `accum` micro-batches of an optimizer step; gradients add up in .grad.

    The loss is divided by `accum`: the mean of the micro-batches' means is the global batch's mean
    (equal micro-batches), so the summed gradient is the large batch's, and DDP then averages over
    processes as without accumulation. DDP all-reduces only in the micro-batch that `syncs` (the
    last); the others run under its no_sync, which defers the all-reduce, not skips it. (Explicit
    rather than Accelerate's accumulate(): that keeps its own micro-step counter, which a
    mid-epoch resume would have to restore, and only syncs at the end of prepared DataLoaders.)
    """
    with nullcontext() if syncs else no_sync(model):
        logits = model(images)
        loss = batch_loss(logits, labels)
        backward(loss / accum if accum > 1 else loss)
    return logits, loss


def evaluation_model(prepared: torch.nn.Module, bare: torch.nn.Module, compile_kwargs: dict) -> torch.nn.Module:
    """The model evaluation runs: `bare` (no DDP: no hooks, no collectives, so a rank without a val
    batch cannot hang the others), compiled on its own when `prepared` is compiled.

    Not accelerator.unwrap_model(prepared): for a compiled model it returns the compiled wrapper,
    whose forward still calls DDP's, and rewires that wrapper's _orig_mod as a side effect.
    """
    return torch.compile(bare, **compile_kwargs) if is_compiled_module(prepared) else bare


def step_counts(loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(loss x n, correct, n) of one step as a float64 device tensor, made without a host-device sync.

    n is known on the host, but torch.tensor(n, device=cuda) copies it over and waits for the
    stream: a sync on every step that would stop the host from queueing ahead of the GPU.
    new_full fills on the device instead. (launch/gpu_check.py runs this under sync-debug mode.)
    """
    n = labels.numel()
    correct = (logits.argmax(1) == labels).sum().double()
    return torch.stack([loss.detach().double() * n, correct, correct.new_full((), n)])


class _Stopped(Exception):
    """The ranks agreed to stop (a signal); the checkpoint of the position is written."""

    def __init__(self, signal_name: str, position: Position):
        super().__init__(signal_name)
        self.signal_name, self.position = signal_name, position


@dataclass
class Run:
    """What the phases of one run share; built by `setup`."""

    cfg: Config
    accelerator: Accelerator
    rec: Recorder
    ckpt: CheckpointManager
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    train_loader: BatchLoader
    val_loader: BatchLoader
    classes: list[str]
    progress: Progress
    signals: StopSignals
    dog: Watchdog
    steps_per_epoch: int
    """Optimizer steps an epoch; the loader yields accum micro-batches for each."""
    accum: int
    eval_model: torch.nn.Module

    def lr(self, epoch: int, step: int) -> float:
        """The learning rate of optimizer step `step` (0-based) of `epoch`."""
        return lr_at_step(self.cfg.optim, epoch, step, self.steps_per_epoch, total_epochs=self.cfg.train.epochs,
                          global_batch_size=self.cfg.train.global_batch_size)

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def bare(self) -> torch.nn.Module:
        # The model itself, without DDP's or torch.compile's wrapper: a compiled module's
        # state_dict prefixes every key with `_orig_mod.`, which eval, predict and resume
        # would not recognise. (Accelerate compiles when model.compile or its own dynamo setting asks.)
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)


def train(cfg: Config, config_name: str = "run", resume: Path | None = None, overrides: list[str] = (),
          force: bool = False) -> Path:
    """Train (or resume) one run; returns its run folder. Every process calls this.

    A resume refuses config changes that change what the run computes unless `force`
    (resume_check.py); `overrides` are the command line's, recorded with each resume.
    """
    with StopSignals() as signals:  # from the start: a signal during set-up stops the run at its first check
        run = setup(cfg, config_name, resume, signals, list(overrides), force)
        try:
            with run.dog, _peer_failures(run.accelerator.process_index, cfg.train.collective_timeout):
                start = run.progress.position.epoch
                if start >= cfg.train.epochs:
                    run.rec.print(f"run already complete ({start} of {cfg.train.epochs} epochs); raise train.epochs to continue")
                    run.rec.finish()
                    return run.ckpt.run_dir
                try:
                    for epoch in range(start, cfg.train.epochs):
                        sums, train_time = train_epoch(run, epoch)
                        end_epoch(run, epoch, sums, train_time)
                except _Stopped as stop:
                    _stop(run, stop)
                finish(run)
        finally:
            run.ckpt.close()
    return run.ckpt.run_dir


# -- set-up -------------------------------------------------------------------------------------
def setup(cfg: Config, config_name: str, resume: Path | None, signals: StopSignals, overrides: list[str] = (),
          force: bool = False) -> Run:
    wandb_mode = resolve_mode(cfg.tracking)
    accelerator = make_accelerator(cfg.train.device, cfg.train.mixed_precision,
                                   log_with=None if wandb_mode == "disabled" else "wandb", compile_model=cfg.model.compile,
                                   collective_timeout=cfg.train.collective_timeout, cudnn_benchmark=cfg.train.cudnn_benchmark)
    world = accelerator.num_processes
    batch_per_rank, accum = cfg.train.batch_split(world)

    # One process checks the files (cached by path, size and mtime); the others get its verdict.
    train_split, val_split, skipped = shared(lambda: usable_splits(cfg.data), accelerator.is_main_process, broadcast_object_list)
    classes = list(train_split.classes)
    if len(train_split) < cfg.train.global_batch_size:
        raise ConfigError(f"config key 'train.global_batch_size': {cfg.train.global_batch_size} is more than the {len(train_split)} training images")

    ckpt, claim = claim_run_folder(accelerator, cfg, config_name, resume)
    try:
        rec = Recorder(ckpt.run_dir, accelerator.is_main_process, cfg.train.progress, accelerator, cfg.tracking, wandb_mode)
        set_seed(cfg.train.seed)  # same new-head initialisation on every rank
        with accelerator.main_process_first():  # one download into the cache, the other ranks read it
            model = build_model(cfg.model, len(classes))
        use_sync_bn, sync_bn_why = sync_bn.wanted(cfg.model.sync_bn, batch_per_rank, world)
        if use_sync_bn:  # before the optimizer and prepare; the parameters stay the same tensors
            model, converted = sync_bn.convert(model)
            sync_bn_why += f"; {converted} BatchNorm layers synchronised"
        optimizer = build_optimizer(cfg.optim, model, fused=accelerator.device.type == "cuda")
        progress, resume_changes = Progress(), {}
        if claim.resume_from is not None:
            progress, resume_changes = restore(cfg, Path(claim.resume_from), ckpt, classes, model, optimizer, accelerator, force)
            rec.continue_clock(progress.elapsed)
        model, optimizer = accelerator.prepare(model, optimizer)
        eval_model = evaluation_model(model, accelerator.unwrap_model(model, keep_torch_compile=False),
                                      accelerator.state.dynamo_plugin.to_kwargs())

        place = placement(accelerator, channels_last=cfg.model.channels_last, workers=cfg.data.num_workers)
        steps_per_epoch = len(train_split) // cfg.train.global_batch_size  # optimizer steps
        if cfg.train.max_steps_per_epoch:
            steps_per_epoch = min(steps_per_epoch, cfg.train.max_steps_per_epoch)
        train_loader = build_loader(cfg.data, train_split, train=True, batch_per_rank=batch_per_rank, placement=place,
                                    seed=cfg.train.seed, max_steps=steps_per_epoch * accum, resume_state=progress.loader_state,
                                    accum=accum)
        if len(train_loader) != steps_per_epoch * accum:  # the loaders' contract with this loop; a bug if it breaks
            raise RuntimeError(f"the loader yields {len(train_loader)} micro-batches an epoch, not {steps_per_epoch} x {accum}")
        val_loader = build_loader(cfg.data, val_split, train=False, batch_per_rank=cfg.train.eval_batch_size,
                                  placement=place, seed=cfg.train.seed)
    except BaseException:
        ckpt.close()
        raise
    pos = progress.position
    env = environment(world, num_nodes(accelerator), accelerator.device)
    # What the config's automatic choices became in this run (environment.json and the W&B config).
    env.update(loader=train_loader.kind, micro_batch_size=batch_per_rank, grad_accum_steps=accum, sync_bn=use_sync_bn)
    resume_note = {"overrides": overrides, "changed": resume_changes, "forced": force} if claim.resume_from else None
    rec.start(cfg, classes, env, pos.epoch, resumed=claim.resume_from is not None,
              start_step=pos.step, global_step=pos.epoch * steps_per_epoch + pos.step, resume_note=resume_note)
    rec.log_data_check(skipped.record())
    rec.print(skipped.line())
    for note in claim.notes:
        rec.print(f"warning: {note}")
    rec.print(f"run {ckpt.run_dir}: {len(train_split)} train / {len(val_split)} val images, {len(classes)} classes, "
              f"{world} process(es) on {accelerator.device.type}, global batch {cfg.train.global_batch_size} = "
              f"{batch_per_rank} x {world} process(es) x {accum} accumulation step(s), {steps_per_epoch} steps/epoch, "
              f"precision {cfg.train.mixed_precision}, {train_loader.kind} loader, "
              f"sync_bn {'on' if use_sync_bn else 'off'} ({sync_bn_why})"
              + (f", torch.compile ({accelerator.state.dynamo_plugin.backend.value.lower()})" if is_compiled_module(model) else "")
              + (f"; resumed from {Path(claim.resume_from).name} at epoch {pos.epoch + 1} step {pos.step}" if claim.resume_from else ""))
    return Run(cfg, accelerator, rec, ckpt, model, optimizer, train_loader, val_loader, classes, progress, signals,
               Watchdog(cfg.train.watchdog, accelerator.process_index), steps_per_epoch, accum, eval_model)


def restore(cfg: Config, path: Path, ckpt: CheckpointManager, classes: list[str], model: torch.nn.Module,
            optimizer: torch.optim.Optimizer, accelerator: Accelerator, force: bool) -> tuple[Progress, dict]:
    """Load a checkpoint into the (not yet prepared) model and optimizer.

    Returns where to continue and the config keys the resume changes; refuses other classes, a change that
    alters the result (unless forced) and, forced, a model the checkpoint does not fit, each in one line.
    """
    state = checkpoint.load(path)
    if state["classes"] != classes:
        raise ConfigError(f"the classes in {cfg.data.root} differ from those the run was trained on ({state['classes']})")
    changes = resume_check.check(state["config"], cfg.to_dict(), force)
    try:
        progress = ckpt.restore(state, model, optimizer, accelerator.process_index, accelerator.num_processes,
                                scaler=accelerator.scaler)
    except RuntimeError as exc:  # only with --force: a model or optimizer the checkpoint does not fit
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]  # torch's: a title, then the misfits
        raise errors.CheckpointError(f"{path} does not fit this config (model.name={cfg.model.name}): "
                                     f"{(lines[1:] or lines or ['?'])[0][:200]}") from None
    return progress, changes


def claim_run_folder(accelerator: Accelerator, cfg: Config, config_name: str, resume: Path | None) -> tuple[CheckpointManager, Claim]:
    """The main process claims the folder (lock, start or resume); every rank learns the outcome, errors included."""
    manager = None
    if accelerator.is_main_process:
        try:
            claim, manager = CheckpointManager.claim(cfg.train.output_dir, cfg.train.name or default_run_name(config_name),
                                                     cfg.train.resume, resume, cfg.train)
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


# -- one epoch of training ----------------------------------------------------------------------
def train_epoch(run: Run, epoch: int) -> tuple[torch.Tensor, float]:
    """Train one epoch (or its rest, after a mid-epoch resume).

    Returns this rank's (loss x n, correct, n, n trained by this attempt) and the training time.
    """
    cfg, device = run.cfg.train, run.device
    steps, accum = run.steps_per_epoch, run.accum
    resumed_here = run.progress.position.epoch == epoch and run.progress.position.step > 0
    skip = run.progress.position.step if resumed_here else 0
    lr = run.lr(epoch, min(skip, steps - 1))
    run.train_loader.set_epoch(epoch, skip * accum)  # the loader counts micro-batches
    run.model.train()
    run.optimizer.zero_grad(set_to_none=True)
    # Running sums stay on the device; reading them back is a sync, so it happens only every log_every steps.
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    if resumed_here and run.progress.epoch_sums is not None:
        sums += torch.tensor(run.progress.epoch_sums, dtype=torch.float64, device=device)
    restored = sums.clone()
    window = _Window(run, epoch, steps, lr, sums)
    run.rec.epoch_bar(steps, epoch, cfg.epochs)
    run.rec.advance(skip)
    epoch_start = step_end = time.perf_counter()
    for micro, (images, labels) in enumerate(run.train_loader, skip * accum):
        window.data_wait += time.perf_counter() - step_end  # host time blocked on the loader for this batch
        step, last = micro // accum + 1, micro % accum == accum - 1  # step: 1-based optimizer step in the epoch
        logits, loss = micro_step(run.model, images, labels, run.accelerator.backward, accum, last, run.accelerator.no_sync)
        sums += step_counts(loss, logits, labels)
        run.dog.beat()
        if not last:
            step_end = time.perf_counter()
            continue
        window.lr = lr = run.lr(epoch, step - 1)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        run.ckpt.check()  # a failed background write (full disk) is reported at once
        if step % cfg.log_every == 0 or step == steps:
            window.log(step, sums)
        global_step = epoch * steps + step
        if step < steps and (global_step % cfg.stop_check_every == 0 or run.ckpt.periodic_due(global_step)):
            stop, time_due = agree(run)
            if stop or time_due or run.ckpt.periodic_due(global_step):
                save(run, Position(epoch, step), sums)
            if stop:
                raise _Stopped(run.signals.received or "a peer's signal", Position(epoch, step))
        step_end = time.perf_counter()
    sync(device)
    run.rec.close_bar()
    return torch.cat([sums, (sums - restored)[COUNT:]]), time.perf_counter() - epoch_start


class _Window:
    """The `step` rows: loss and throughput over each log interval, read back from the device once per interval."""

    def __init__(self, run: Run, epoch: int, steps: int, lr: float, sums: torch.Tensor):
        self.run, self.epoch, self.steps, self.lr = run, epoch, steps, lr
        self.logged = sums.clone()
        self.last = time.perf_counter()
        self.last_step = run.progress.position.step if run.progress.position.epoch == epoch else 0
        self.data_wait = 0.0

    def log(self, step: int, sums: torch.Tensor) -> None:
        run = self.run
        # On CUDA the host runs ahead of the device, so a clock read without a sync times kernel
        # launches, not work. Syncing every step would stall the queue; once per interval makes the
        # interval's wall time honest at a negligible cost.
        sync(run.device)
        now = time.perf_counter()
        done = step - self.last_step
        interval = max(now - self.last, 1e-9)
        loss_sum, _, count = (sums - self.logged).tolist()  # this rank's, since the last log
        images_per_s = done * run.cfg.train.global_batch_size / interval
        window_loss = loss_sum / max(count, 1)
        run.rec.advance(done, window_loss, images_per_s)
        run.rec.log_step({
            "step": self.epoch * self.steps + step, "epoch": self.epoch, "lr": self.lr,
            "loss": window_loss, "images_per_s": images_per_s,
            "images_per_s_per_process": images_per_s / run.world, "step_time": interval / done,
            "data_wait_fraction": min(self.data_wait / interval, 1.0), "elapsed": now - run.rec.started,
        })
        self.last, self.last_step, self.logged, self.data_wait = now, step, sums.clone(), 0.0


def agree(run: Run) -> tuple[bool, bool]:
    """One small all-reduce: has any rank seen a stop signal; is a time-based checkpoint due by the main process's clock."""
    run.ckpt.heartbeat()
    flags = torch.tensor([float(run.signals.requested), float(run.accelerator.is_main_process and run.ckpt.time_due())],
                         device=run.device)
    if run.world > 1:
        flags = run.accelerator.reduce(flags, reduction="sum")
    stop, due = flags.tolist()
    return stop > 0, due > 0


def save(run: Run, position: Position, sums: torch.Tensor, is_best: bool = False) -> None:
    """Every rank: gather the per-rank parts (a collective), then the main process writes in the background."""
    rank_sums = gather_object([sums[:COUNT + 1].tolist()])
    loader_states = gather_object([run.train_loader.resume_state()])
    run.progress.elapsed = time.perf_counter() - run.rec.started
    progress = Progress(position, run.progress.best, run.progress.elapsed)
    state = run.ckpt.state(model=run.bare(), optimizer=run.optimizer, progress=progress, rank_sums=rank_sums,
                           loader_states=loader_states, world=run.world, config=run.cfg.to_dict(), classes=run.classes,
                           scaler=run.accelerator.scaler)
    run.ckpt.save(state, position.epoch * run.steps_per_epoch + position.step, is_best)


def _stop(run: Run, stop: _Stopped) -> None:
    """After the stop checkpoint was started: let it land, record the stop, close W&B, and leave with EXIT_PREEMPTED."""
    with run.dog.pause():
        run.ckpt.wait()
        # No rank leaves before the checkpoint has landed: under srun --kill-on-bad-exit a rank that
        # exits first gets its launcher to fail, and SLURM then signals the main node's task mid-write.
        run.accelerator.wait_for_everyone()
        pos = stop.position
        run.rec.close_bar()
        run.rec.log({"event": "stopped", "signal": stop.signal_name, "epoch": pos.epoch, "step": pos.step,
                     "elapsed": run.progress.elapsed})
        run.rec.print(f"stopped by {stop.signal_name} at epoch {pos.epoch + 1} step {pos.step}; checkpoint written to "
                      f"{run.ckpt.dir / 'last.pt'}; the same command (or --resume {run.ckpt.run_dir}) continues "
                      f"(exit code {errors.EXIT_PREEMPTED})")
        run.rec.finish()
    raise PreemptedError(f"stopped by {stop.signal_name}; resume to continue from epoch {pos.epoch + 1} step {pos.step}")


# -- end of an epoch: evaluation, record, checkpoint --------------------------------------------
def end_epoch(run: Run, epoch: int, sums: torch.Tensor, train_time: float) -> None:
    cfg = run.cfg
    totals = run.accelerator.reduce(sums, reduction="sum").cpu()
    val, eval_time = evaluate(run)
    best = run.progress.best
    is_best = val.accuracy > best["val_acc"]
    if is_best:
        best.update(val_acc=val.accuracy, epoch=epoch)
    elapsed = time.perf_counter() - run.rec.started
    if best["time_to_target"] is None and val.accuracy >= cfg.tracking.target_accuracy:
        best["time_to_target"] = elapsed
    seen = float(totals[COUNT])
    record = {
        "step": (epoch + 1) * run.steps_per_epoch, "epoch": epoch, "lr": run.lr(epoch, 0),
        "train_loss": float(totals[LOSS_SUM]) / max(seen, 1), "train_acc": float(totals[CORRECT]) / max(seen, 1),
        "train_images": int(seen), "val_loss": val.loss, "val_acc": val.accuracy, "val_count": val.count,
        "val_per_class": dict(zip(run.classes, val.per_class_accuracy())), "val_confusion": val.confusion,
        "images_per_s": float(totals[COUNT + 1]) / max(train_time, 1e-9),  # images of this attempt, over its time
        "train_time": train_time, "epoch_time": train_time + eval_time, "elapsed": elapsed,
    }
    run.rec.log_epoch(record)
    run.rec.print(f"epoch {epoch + 1:>3}/{cfg.train.epochs}  lr {record['lr']:.2e}  train loss {record['train_loss']:.4f} "
                  f"acc {record['train_acc']:.4f}  val loss {val.loss:.4f} acc {val.accuracy:.4f}  "
                  f"{record['images_per_s']:.1f} img/s  {record['epoch_time']:.1f}s")
    # Written in the background; the ranks stay in step through the next epoch's all-reduces.
    save(run, Position(epoch + 1, 0), torch.zeros(3, dtype=torch.float64), is_best)
    run.progress.position = Position(epoch + 1, 0)
    stop, _ = agree(run)  # a signal during evaluation: the epoch's checkpoint is the stop checkpoint
    if stop and epoch + 1 < cfg.train.epochs:  # after the last epoch the run simply ends
        raise _Stopped(run.signals.received or "a peer's signal", Position(epoch + 1, 0))


def evaluate(run: Run) -> tuple[EvalResult, float]:
    """Exact validation accuracy of the current weights, and the time it took."""
    start = time.perf_counter()
    if run.world > 1:
        # DDP broadcasts rank 0's BatchNorm buffers before each forward, but each rank's last forward
        # updated them with its own batch; average them so every rank evaluates, and saves, the same model.
        for buffer in run.bare().buffers():
            if buffer.is_floating_point():
                buffer.copy_(run.accelerator.reduce(buffer.detach().clone(), reduction="mean"))
    with run.accelerator.autocast():
        counts = local_counts(run.eval_model, run.val_loader, len(run.classes), run.device, on_batch=run.dog.beat)
    val = EvalResult.from_counts(run.accelerator.reduce(counts, reduction="sum"), len(run.classes))
    return val, time.perf_counter() - start


def finish(run: Run) -> None:
    # Replicas must hold identical weights; a mismatch means the processes did not train as one.
    digests = gather_object([weights_digest(run.bare())])
    if len(set(digests)) > 1:
        run.rec.print(f"warning: processes ended with different weights: {digests}")
    best = run.progress.best
    with run.dog.pause():
        run.ckpt.wait()  # the last checkpoint is on disk before the run says it has ended
        run.rec.print(f"best val accuracy {best['val_acc']:.4f} at epoch {best['epoch'] + 1}; run folder {run.ckpt.run_dir}")
        run.rec.finish({"best_val_acc": best["val_acc"], "best_epoch": best["epoch"],
                        "total_time": time.perf_counter() - run.rec.started,
                        "target_accuracy": run.cfg.tracking.target_accuracy, "time_to_target": best["time_to_target"],
                        "weights_digest_per_rank": digests})


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
            raise HungError(f"rank {self.rank}: a collective failed; a peer rank is hung or dead "
                            f"(train.collective_timeout={self.timeout:g} s): {first[:200]}") from None
        return False
