"""The training loop: the one place where distribution and precision are handled."""

from __future__ import annotations

import hashlib
import time
from datetime import datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.utils import broadcast_object_list, gather_object, is_compiled_module, set_seed

from . import checkpoint
from .config import Config, ConfigError, OptimConfig, TrainConfig
from .data import build_loader, scan_dataset
from .distributed import make_accelerator, num_nodes, placement
from .evaluate import EvalResult, local_counts
from .model import build_model
from .recorder import Recorder, environment
from .schedule import lr_at
from .tracking import resolve_mode


def _run_dir(cfg: Config, config_name: str) -> Path:
    name = cfg.train.name or f"{config_name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    return Path(cfg.train.output_dir) / name


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
    """Each process's share of the global batch; the global batch, and so the recipe, stays the same at any world size."""
    if cfg.global_batch_size % world:
        raise ConfigError(f"config key 'train.global_batch_size': {cfg.global_batch_size} does not split evenly over {world} processes")
    return cfg.global_batch_size // world


def build_optimizer(cfg: OptimConfig, model: torch.nn.Module, fused: bool = False) -> torch.optim.Optimizer:
    """SGD as the config sets it; the learning rate is overwritten each epoch from schedule.lr_at.

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


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor,
               backward=torch.Tensor.backward) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step (forward, loss, backward, update); `backward` is Accelerate's under DDP or mixed precision."""
    logits = model(images)
    loss = F.cross_entropy(logits.float(), labels)
    optimizer.zero_grad(set_to_none=True)
    backward(loss)
    optimizer.step()
    return logits, loss


def step_counts(loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(loss x n, correct, n) of one step as a float64 device tensor, made without a host-device sync.

    n is known on the host, but torch.tensor(n, device=cuda) copies it over and waits for the
    stream: a sync on every step that would stop the host from queueing ahead of the GPU.
    new_full fills on the device instead. (launch/gpu_check.py runs this under sync-debug mode.)
    """
    n = labels.numel()
    correct = (logits.argmax(1) == labels).sum().double()
    return torch.stack([loss.detach().double() * n, correct, correct.new_full((), n)])


def train(cfg: Config, config_name: str = "run", resume: Path | None = None) -> Path:
    """Train (or resume) one run; returns its run folder. Every process calls this."""
    wandb_mode = resolve_mode(cfg.tracking)
    accelerator = make_accelerator(cfg.train.device, cfg.train.mixed_precision,
                                   log_with=None if wandb_mode == "disabled" else "wandb", compile_model=cfg.model.compile,
                                   cudnn_benchmark=cfg.train.cudnn_benchmark)
    world = accelerator.num_processes
    batch_per_rank = batch_per_process(cfg.train, world)

    train_split, val_split = scan_dataset(cfg.data.root)
    classes = list(train_split.classes)
    if len(train_split) < cfg.train.global_batch_size:
        raise ConfigError(f"config key 'train.global_batch_size': {cfg.train.global_batch_size} is more than the {len(train_split)} training images")

    # All ranks must agree on the folder even if their clocks tick over between them.
    run_dir = [resume if resume is not None else _run_dir(cfg, config_name)]
    broadcast_object_list(run_dir)
    run_dir = Path(run_dir[0])
    if resume is None and (run_dir / "checkpoints").exists():
        raise ConfigError(f"run folder {run_dir} already holds checkpoints; pass --resume {run_dir} or choose another train.name")
    rec = Recorder(run_dir, accelerator.is_main_process, cfg.train.progress, accelerator, cfg.tracking, wandb_mode)

    set_seed(cfg.train.seed)  # same new-head initialisation on every rank
    with accelerator.main_process_first():  # one download into the cache, the other ranks read it
        model = build_model(cfg.model, len(classes))
    optimizer = build_optimizer(cfg.optim, model, fused=accelerator.device.type == "cuda")
    start_epoch, best = 0, {"val_acc": -1.0, "epoch": -1, "time_to_target": None}
    loader_state = None
    if resume is not None:
        state = checkpoint.load(run_dir / "checkpoints" / "last.pt")
        if state["classes"] != classes:
            raise ConfigError(f"the classes in {cfg.data.root} differ from those the run was trained on ({state['classes']})")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, best = state["epoch"] + 1, {"time_to_target": None, **state["best"]}
        rec.continue_clock(state.get("elapsed", 0.0))
        checkpoint.set_rng_state(state["rng"])
        # Per-rank loader positions only mean something for the same shards, i.e. the same world size.
        saved = state.get("loader_states") or []
        if state.get("world_size") == world and len(saved) == world:
            loader_state = saved[accelerator.process_index]
    model, optimizer = accelerator.prepare(model, optimizer)
    device = accelerator.device

    def bare(prepared: torch.nn.Module) -> torch.nn.Module:
        # The model itself, without DDP's or torch.compile's wrapper: a compiled module's
        # state_dict prefixes every key with `_orig_mod.`, which eval, predict and resume
        # would not recognise. (Accelerate compiles when model.compile or its own dynamo setting asks.)
        return accelerator.unwrap_model(prepared, keep_torch_compile=False)

    place = placement(accelerator, channels_last=cfg.model.channels_last, workers=cfg.data.num_workers)
    train_loader = build_loader(cfg.data, train_split, train=True, batch_per_rank=batch_per_rank, placement=place,
                                seed=cfg.train.seed, max_steps=cfg.train.max_steps_per_epoch, resume_state=loader_state)
    val_loader = build_loader(cfg.data, val_split, train=False, batch_per_rank=cfg.train.eval_batch_size,
                              placement=place, seed=cfg.train.seed)

    rec.start(cfg, classes, environment(world, num_nodes(accelerator), device), start_epoch, resumed=resume is not None)
    rec.print(f"run {run_dir}: {len(train_split)} train / {len(val_split)} val images, {len(classes)} classes, "
              f"{world} process(es) on {device.type}, global batch {cfg.train.global_batch_size}, "
              f"{len(train_loader)} steps/epoch, precision {cfg.train.mixed_precision}"
              + (f", torch.compile ({accelerator.state.dynamo_plugin.backend.value.lower()})" if is_compiled_module(model) else ""))
    if start_epoch >= cfg.train.epochs:
        rec.print(f"run already complete ({start_epoch} of {cfg.train.epochs} epochs); raise train.epochs to continue")
        rec.finish()
        return run_dir

    for epoch in range(start_epoch, cfg.train.epochs):
        lr = lr_at(cfg.optim, epoch, cfg.train.epochs)
        for group in optimizer.param_groups:
            group["lr"] = lr
        train_loader.set_epoch(epoch)
        model.train()
        # Running sums stay on the device; reading them back is a sync, so it happens only every log_every steps.
        sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss * n, correct, n
        rec.epoch_bar(len(train_loader), epoch, cfg.train.epochs)
        epoch_start = last_log = step_end = time.perf_counter()
        logged_sums, data_wait = sums.clone(), 0.0
        for step, (images, labels) in enumerate(train_loader, 1):
            data_wait += time.perf_counter() - step_end  # host time blocked on the loader for this batch
            logits, loss = train_step(model, optimizer, images, labels, accelerator.backward)
            sums += step_counts(loss, logits, labels)
            if step % cfg.train.log_every == 0 or step == len(train_loader):
                # On CUDA the host runs ahead of the device, so a clock read without a sync times kernel
                # launches, not work. Syncing every step would stall the queue; once per interval makes the
                # interval's wall time honest at a negligible cost.
                sync(device)
                now = time.perf_counter()
                done = step % cfg.train.log_every or cfg.train.log_every
                interval = max(now - last_log, 1e-9)
                window = (sums - logged_sums).tolist()  # this rank's loss * n, correct, n since the last log
                images_per_s = done * cfg.train.global_batch_size / interval
                window_loss = window[0] / max(window[2], 1)
                rec.advance(done, window_loss, images_per_s)
                rec.log_step({
                    "step": epoch * len(train_loader) + step, "epoch": epoch, "lr": lr,
                    "loss": window_loss, "images_per_s": images_per_s,
                    "images_per_s_per_process": images_per_s / world, "step_time": interval / done,
                    "data_wait_fraction": min(data_wait / interval, 1.0), "elapsed": now - rec.started,
                })
                last_log, logged_sums, data_wait = now, sums.clone(), 0.0
            step_end = time.perf_counter()
        sync(device)
        train_time = time.perf_counter() - epoch_start
        rec.close_bar()

        train_sums = accelerator.reduce(sums, reduction="sum").cpu()
        # DDP keeps parameters in step but each rank's BatchNorm running statistics come from its
        # own last batches; average them so every rank evaluates, and saves, the same model.
        if world > 1:
            for buffer in bare(model).buffers():
                if buffer.is_floating_point():
                    buffer.copy_(accelerator.reduce(buffer.detach().clone(), reduction="mean"))
        with accelerator.autocast():
            # Without DDP's wrapper (no collectives in evaluation), with torch.compile's if there is one.
            counts = local_counts(accelerator.unwrap_model(model), val_loader, len(classes), device)
        val = EvalResult.from_counts(accelerator.reduce(counts, reduction="sum"), len(classes))
        epoch_time = time.perf_counter() - epoch_start

        seen = float(train_sums[2])
        is_best = val.accuracy > best["val_acc"]
        if is_best:
            best = {**best, "val_acc": val.accuracy, "epoch": epoch}
        elapsed = time.perf_counter() - rec.started
        if best["time_to_target"] is None and val.accuracy >= cfg.tracking.target_accuracy:
            best["time_to_target"] = elapsed
        record = {
            "step": (epoch + 1) * len(train_loader), "epoch": epoch, "lr": lr,
            "train_loss": float(train_sums[0]) / max(seen, 1), "train_acc": float(train_sums[1]) / max(seen, 1),
            "train_images": int(seen), "val_loss": val.loss, "val_acc": val.accuracy, "val_count": val.count,
            "val_per_class": dict(zip(classes, val.per_class_accuracy())), "val_confusion": val.confusion,
            "images_per_s": seen / train_time, "train_time": train_time, "epoch_time": epoch_time,
            "elapsed": elapsed,
        }
        rec.log_epoch(record)
        rec.print(f"epoch {epoch + 1:>3}/{cfg.train.epochs}  lr {lr:.2e}  train loss {record['train_loss']:.4f} "
                  f"acc {record['train_acc']:.4f}  val loss {val.loss:.4f} acc {val.accuracy:.4f}  "
                  f"{record['images_per_s']:.1f} img/s  {epoch_time:.1f}s")
        loader_states = gather_object([train_loader.resume_state()])  # every rank's, saved by the main one
        rec.save_checkpoint({
            "format": checkpoint.FORMAT, "epoch": epoch, "model": bare(model).state_dict(),
            "optimizer": optimizer.state_dict(), "schedule": {"epoch": epoch, "lr": lr}, "rng": checkpoint.rng_state(),
            "config": cfg.to_dict(), "classes": classes, "best": best, "world_size": world,
            "loader_states": loader_states, "elapsed": elapsed,
        }, is_best)  # written in the background; the ranks stay in step through the next epoch's all-reduces

    # Replicas must hold identical weights; a mismatch means the processes did not train as one.
    digests = gather_object([weights_digest(bare(model))])
    if len(set(digests)) > 1:
        rec.print(f"warning: processes ended with different weights: {digests}")
    rec.print(f"best val accuracy {best['val_acc']:.4f} at epoch {best['epoch'] + 1}; run folder {run_dir}")
    rec.finish({"best_val_acc": best["val_acc"], "best_epoch": best["epoch"], "total_time": time.perf_counter() - rec.started,
                "target_accuracy": cfg.tracking.target_accuracy, "time_to_target": best["time_to_target"],
                "weights_digest_per_rank": digests})
    return run_dir
