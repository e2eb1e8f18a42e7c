"""The parts of a run, built one way for every entry point: `train`, every `bench` mode and the GPU check.

Each builder receives the config section it needs and returns plain parts: the Accelerator, the
data after the data check, how the global batch is dealt, the model and optimizer (sync_bn,
placement and precision as the run has them) and the loaders. `train` adds what only a run has
(its folder, record and resume) between the builders, through `build_parts`' `load` hook.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object, set_seed
from timm.data import Mixup
from timm.utils import ModelEmaV3

from . import sync_bn
from .config import Config, ConfigError, DataConfig, TrainConfig, levers_on
from .data import BatchLoader, Split, build_loader, stage
from .data.contract import ReaderState
from .data.usable import Skipped, shared, usable_splits
from .distributed import make_accelerator, placement
from .errors import DataError
from .model import build_model
from .schedule import lr_at_step
from .steps import build_mixup, build_optimizer, evaluation_model


def run_accelerator(cfg: Config, log_with: str | None = None) -> Accelerator:
    """The Accelerator of a run: device, precision, compile, the collective timeout and cuDNN's search as configured."""
    t = cfg.train
    return make_accelerator(
        t.device,
        t.mixed_precision,
        log_with=log_with,
        compile_model=cfg.model.compile,
        collective_timeout=t.collective_timeout,
        cudnn_benchmark=t.cudnn_benchmark,
    )


@dataclass(frozen=True)
class CheckedData:
    """The splits holding only files both loaders decode, and what the data check left out."""

    train: Split
    val: Split
    skipped: Skipped

    @property
    def classes(self) -> list[str]:
        return list(self.train.classes)


STAGE_POLL_S = 2.0
"""How often the processes compare notes while a node copies its pack (a short collective each time)."""


def staged_data(cfg: DataConfig, accelerator: Accelerator) -> DataConfig:
    """The data section with data.root on node-local disk when data.stage_to is set; unchanged otherwise.

    The local main process of each node copies (or reuses) the pack in a thread while every process
    takes part in a short collective every STAGE_POLL_S: one long wait for a big copy would trip
    train.collective_timeout. Every process then learns every node's outcome, so a failure on any
    node (no room, a corrupted shard) is raised on every rank before any of them reads data.
    """
    if not cfg.stage_to:
        return cfg
    work = stage.stage if accelerator.is_local_main_process else stage.destination  # the name the copier uses
    with ThreadPoolExecutor(1, thread_name_prefix="stage") as pool:
        job = pool.submit(work, cfg.root, cfg.stage_to)
        while not all(gather_object([job.done()])):
            wait([job], timeout=STAGE_POLL_S)
        try:
            outcome = job.result()
        except Exception as exc:  # sent to every rank below, then raised everywhere
            outcome = exc
    if isinstance(outcome, Exception) and not isinstance(outcome, DataError):  # a bug: its text travels
        sent = RuntimeError(f"data.stage_to failed on process {accelerator.process_index}: {outcome!r}")
    else:
        sent = outcome
    for other in gather_object([sent]):
        if isinstance(other, Exception):
            raise outcome if isinstance(outcome, Exception) else other  # a rank's own error first
    if isinstance(outcome, stage.Staged):
        print(outcome.line(), flush=True)  # once per node: each node says where its copy is
        return replace(cfg, root=str(outcome.root))
    return replace(cfg, root=str(outcome))


def checked_data(cfg: Config, accelerator: Accelerator) -> CheckedData:
    """One process checks the files (cached by path, size and mtime); the others get its verdict.

    With data.stage_to, every node first stages the pack and every process reads the staged copy."""
    data_cfg = staged_data(cfg.data, accelerator)
    train, val, skipped = shared(lambda: usable_splits(data_cfg), accelerator.is_main_process, broadcast_object_list)
    if len(train) < cfg.train.global_batch_size:
        raise ConfigError(
            f"config key 'train.global_batch_size': {cfg.train.global_batch_size} is more than the "
            f"{len(train)} training images"
        )
    return CheckedData(train, val, skipped)


@dataclass(frozen=True)
class BatchLayout:
    """How one optimizer step's global batch is dealt: `micro_batch` images per process, `accum` micro-batches each."""

    global_batch: int
    world: int
    micro_batch: int
    accum: int
    steps_per_epoch: int
    """Optimizer steps an epoch; the training loader yields `accum` micro-batches for each."""


def batch_layout(cfg: TrainConfig, world: int, num_train: int) -> BatchLayout:
    micro, accum = cfg.batch_split(world)
    steps = num_train // cfg.global_batch_size  # the tail that does not fill a global batch waits for the next epoch
    if cfg.max_steps_per_epoch:
        steps = min(steps, cfg.max_steps_per_epoch)
    return BatchLayout(cfg.global_batch_size, world, micro, accum, steps)


def learning_rate(cfg: Config, layout: BatchLayout, epoch: int, step: int) -> float:
    """The learning rate of optimizer step `step` (0-based) of `epoch`: the run's schedule on its batch layout."""
    return lr_at_step(
        cfg.optim,
        epoch,
        step,
        layout.steps_per_epoch,
        total_epochs=cfg.train.epochs,
        global_batch_size=layout.global_batch,
    )


@dataclass
class Parts:
    """What every entry point trains with: the prepared model and optimizer, the evaluation model and the loaders."""

    layout: BatchLayout
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    eval_model: torch.nn.Module
    train_loader: BatchLoader
    val_loader: BatchLoader
    sync_bn: bool
    sync_bn_why: str
    ema: ModelEmaV3 | None = None
    """model.ema's moving average of the weights (its `.module` is evaluated and saved), or None."""
    levers: dict = field(default_factory=dict)
    """The time-to-accuracy levers the config turns on (config.levers_on)."""
    mixup: Mixup | None = None
    """optim.mixup_alpha / cutmix_alpha's timm Mixup (steps.build_mixup), or None."""

    def choices(self) -> dict:
        """What the config's automatic choices became, and the levers on (environment.json, the W&B config, bench's JSON)."""
        return {
            "loader": self.train_loader.kind,
            "micro_batch_size": self.layout.micro_batch,
            "grad_accum_steps": self.layout.accum,
            "sync_bn": self.sync_bn,
            "levers": self.levers,
        }


def build_parts(
    cfg: Config,
    accelerator: Accelerator,
    data: CheckedData,
    layout: BatchLayout,
    load: Callable[[torch.nn.Module, torch.optim.Optimizer, ModelEmaV3 | None], str | None] | None = None,
) -> Parts:
    """Model, optimizer and loaders as the config asks, in the order they must be made.

    `load(model, optimizer, ema)` runs before `prepare` (a checkpoint fits the bare model) and returns
    this rank's saved loader state, or None; `train` passes its resume there.
    """
    mixup = build_mixup(cfg.optim, len(data.classes), layout.micro_batch)  # refuses an odd micro-batch, first
    set_seed(cfg.train.seed)  # same new-head initialisation on every rank
    with accelerator.main_process_first():  # one download into the cache, the other ranks read it
        model = build_model(cfg.model, len(data.classes))
    use_sync_bn, why = sync_bn.wanted(cfg.model.sync_bn, layout.micro_batch, layout.world)
    if use_sync_bn:  # before the optimizer and prepare; the parameters stay the same tensors
        model, converted = sync_bn.convert(model)
        why += f"; {converted} BatchNorm layers synchronised"
    optimizer = build_optimizer(cfg.optim, model, fused=accelerator.device.type == "cuda")
    # A copy of the bare model (after sync_bn, before DDP): the same on every rank, restored with the checkpoint.
    ema = ModelEmaV3(model, decay=cfg.model.ema) if cfg.model.ema else None
    loader_state = load(model, optimizer, ema) if load is not None else None
    model, optimizer = accelerator.prepare(model, optimizer)
    if ema is not None:
        ema.to(accelerator.device)  # prepare moved the model; the average lives beside it
    eval_model = evaluation_model(
        model, accelerator.unwrap_model(model, keep_torch_compile=False), accelerator.state.dynamo_plugin.to_kwargs()
    )
    train_loader, val_loader = build_loaders(cfg, accelerator, data, layout, loader_state)
    return Parts(
        layout, model, optimizer, eval_model, train_loader, val_loader, use_sync_bn, why, ema, levers_on(cfg), mixup
    )


def build_loaders(
    cfg: Config,
    accelerator: Accelerator,
    data: CheckedData,
    layout: BatchLayout,
    resume_state: ReaderState | str | None = None,
) -> tuple[BatchLoader, BatchLoader]:
    place = placement(accelerator, channels_last=cfg.model.channels_last, workers=cfg.data.num_workers)
    micro_batches = layout.steps_per_epoch * layout.accum
    train_loader = build_loader(
        cfg.data,
        data.train,
        train=True,
        batch_size=layout.micro_batch,
        placement=place,
        seed=cfg.train.seed,
        max_steps=micro_batches,
        resume_state=resume_state,
        accum=layout.accum,
    )
    if len(train_loader) != micro_batches:  # the loaders' contract with the loop; a bug if it breaks
        raise RuntimeError(
            f"the loader yields {len(train_loader)} micro-batches an epoch, not "
            f"{layout.steps_per_epoch} x {layout.accum}"
        )
    val_loader = build_loader(
        cfg.data, data.val, train=False, batch_size=cfg.train.eval_batch_size, placement=place, seed=cfg.train.seed
    )
    return train_loader, val_loader
