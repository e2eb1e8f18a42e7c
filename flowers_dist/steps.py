"""The work of one optimizer step, shared by `train`, `bench train` and the GPU check so that all three time the same thing.

`optimizer_step` takes `accum` micro-batches from the loader, runs forward and backward on each
(DDP all-reduces in the last), sets the learning rate and updates; the running sums it adds to
stay on the device. Nothing here knows about epochs, logging or checkpoints: that is the loop's.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from accelerate.utils import is_compiled_module
from timm.data import Mixup
from timm.data.mixup import mixup_target
from timm.loss import SoftTargetCrossEntropy
from timm.optim import param_groups_weight_decay
from timm.utils import ModelEmaV3

from .config import OptimConfig
from .errors import ConfigError

# Layout of an epoch's running sums, one float64 device tensor so that one reduce sums them all:
# loss x n, correct, n. At the epoch's end the loop appends THIS_ATTEMPT, the n trained by this
# attempt: after a mid-epoch resume the images before the stop are in COUNT, not in THIS_ATTEMPT.
LOSS_SUM, CORRECT, COUNT, THIS_ATTEMPT = 0, 1, 2, 3

Batch = tuple[torch.Tensor, torch.Tensor]


def sync(device: torch.device) -> None:
    """Wait for the device: on CUDA the host runs ahead, so a clock read without this times launches."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def param_groups(cfg: OptimConfig, model: torch.nn.Module) -> list[dict[str, Any]] | Iterator[torch.nn.Parameter]:
    """The optimizer's parameters: model.parameters() as they are (one group, the seed recipe's) unless a lever
    splits them.

    optim.no_decay_norm_bias: timm's param_groups_weight_decay (no decay on 1-d tensors and biases, and on the
    model's own no_weight_decay() names). optim.head_lr_mult: the classifier head (timm's get_classifier())
    gets groups of its own carrying `lr_scale`, which optimizer_step multiplies into the schedule's rate.
    """
    if not cfg.no_decay_norm_bias and cfg.head_lr_mult == 1.0:
        return model.parameters()  # the seed's single group, in the order older checkpoints hold
    if cfg.no_decay_norm_bias:
        skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
        groups = param_groups_weight_decay(model, cfg.weight_decay, no_weight_decay_list=skip)
    else:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    if cfg.head_lr_mult == 1.0:
        return groups
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    head_ids = {id(p) for p in head.parameters()} if isinstance(head, torch.nn.Module) else set()
    if not head_ids:
        raise ConfigError(f"config key 'optim.head_lr_mult': the model ({type(model).__name__}) has no classifier head")
    split = []
    for group in groups:
        body = [p for p in group["params"] if id(p) not in head_ids]
        own = [p for p in group["params"] if id(p) in head_ids]
        split += [{**group, "params": body}] if body else []
        split += [{**group, "params": own, "lr_scale": cfg.head_lr_mult}] if own else []
    return split


def build_optimizer(cfg: OptimConfig, model: torch.nn.Module, fused: bool = False) -> torch.optim.Optimizer:
    """SGD as the config sets it; the learning rate is overwritten before each step from schedule.lr_at_step
    (times each group's `lr_scale`, see param_groups).

    fused=True (pass it on CUDA) updates all parameters in one kernel, and is what keeps fp16
    free of a host sync: GradScaler.step() reads `found_inf` with .item() before a plain
    optimizer's step, but hands it, on the device, to an optimizer that sets
    _step_supports_amp_scaling (fused SGD does), whose kernel skips the update itself.
    """
    optimizer = torch.optim.SGD(
        param_groups(cfg, model),
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        nesterov=cfg.nesterov,
        fused=fused or None,
    )

    def keep_fused(opt: torch.optim.Optimizer) -> None:
        # load_state_dict restores each group's saved `fused`: a checkpoint from a CPU (unfused)
        # run resumed under fp16 on CUDA would hand the scaler's tensors to the unfused step,
        # which refuses them. The choice belongs to this process's device, not to the checkpoint.
        for group in opt.param_groups:
            group["fused"] = fused or None

    optimizer.register_load_state_dict_post_hook(keep_fused)
    return optimizer


def build_mixup(cfg: OptimConfig, num_classes: int, micro_batch: int) -> Mixup | None:
    """optim.mixup_alpha / cutmix_alpha: timm's Mixup, or None when both are 0 (the seed's step).

    Batch mode (one weight, one box per micro-batch: two tensor ops; `elem`/`pair` loop over the images in Python).
    timm mixes image i with image n-1-i and needs an even batch, so an odd micro-batch is refused here, at start.
    optim.label_smoothing moves into Mixup's targets (batch_loss does not smooth soft targets again).
    """
    if not (cfg.mixup_alpha or cfg.cutmix_alpha):
        return None
    if micro_batch % 2:
        key = "optim.mixup_alpha" if cfg.mixup_alpha else "optim.cutmix_alpha"
        raise ConfigError(
            f"config key '{key}': Mixup/CutMix pairs the images of a micro-batch and needs an even one; this run's "
            f"is {micro_batch} (train.global_batch_size / processes / grad_accum_steps, or train.micro_batch_size)"
        )
    return Mixup(
        mixup_alpha=cfg.mixup_alpha,
        cutmix_alpha=cfg.cutmix_alpha,
        prob=cfg.mixup_prob,
        switch_prob=cfg.mixup_switch_prob,
        mode="batch",
        label_smoothing=cfg.label_smoothing,
        num_classes=num_classes,
    )


def mix(mixup: Mixup, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The micro-batch mixed in place on the device, and its (n, classes) soft targets.

    A micro-batch left odd or empty by unreadable files (collate_skipping) mixes its even part; the odd last image
    keeps its own (smoothed) label. Every rank calls timm once a micro-batch, whatever its size, so the draws from
    numpy's global generator (which the checkpoint's rng state holds) stay the same on every rank and on resume.
    """
    even = labels.shape[0] - labels.shape[0] % 2
    _, target = mixup(images[:even], labels[:even])  # a view: timm mixes it in place
    if even < labels.shape[0]:
        rest = mixup_target(labels[even:], mixup.num_classes, smoothing=mixup.label_smoothing)
        target = torch.cat([target, rest])
    return images, target


def batch_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy as sum / n: the same value for n > 0, and 0 (with zero gradients) for a rank's
    empty batch (every file unreadable), where the mean would be NaN and poison every rank through the all-reduce.

    label_smoothing (optim.label_smoothing, torch's): the target is 1 - s on the label plus s / classes everywhere.
    `labels` of shape (n, classes) are Mixup's soft targets (smoothed already): timm's SoftTargetCrossEntropy.
    """
    if labels.ndim == 2:
        if labels.shape[0] == 0:
            return logits.float().sum()  # 0, and zero gradients; timm's mean over no rows is NaN
        return SoftTargetCrossEntropy()(logits.float(), labels)
    return F.cross_entropy(logits.float(), labels, reduction="sum", label_smoothing=label_smoothing) / max(
        labels.numel(), 1
    )


def micro_step(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    backward,
    accum: int,
    syncs: bool,
    no_sync,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward of one of the `accum` micro-batches of an optimizer step; gradients add up in .grad.

    The loss is divided by `accum`: the mean of the micro-batches' means is the global batch's mean
    (equal micro-batches), so the summed gradient is the large batch's, and DDP then averages over
    processes as without accumulation. DDP all-reduces only in the micro-batch that `syncs` (the
    last); the others run under its no_sync, which defers the all-reduce, not skips it. (Explicit
    rather than Accelerate's accumulate(): that keeps its own micro-step counter, which a
    mid-epoch resume would have to restore, and only syncs at the end of prepared DataLoaders.)
    `labels` are class indices, or Mixup's soft targets (see mix and batch_loss).
    """
    with nullcontext() if syncs else no_sync(model):
        logits = model(images)
        loss = batch_loss(logits, labels, label_smoothing)
        backward(loss / accum if accum > 1 else loss)
    return logits, loss


def step_counts(loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(loss x n, correct, n) of one micro-batch as a float64 device tensor, made without a host-device sync.

    n is known on the host, but torch.tensor(n, device=cuda) copies it over and waits for the
    stream: a sync on every step that would stop the host from queueing ahead of the GPU.
    new_full fills on the device instead. (launch/gpu_check.py runs this under sync-debug mode.)
    """
    n = labels.shape[0]
    correct = (logits.argmax(1) == labels).sum().double()
    return torch.stack([loss.detach().double() * n, correct, correct.new_full((), n)])


class LoaderClock:
    """Host time blocked on the loader, summed over the batches fetched through it.

    exact=True (bench) waits for the device before and after each fetch, so that a batch still being
    copied counts as data wait and the rest of the step as compute; training leaves it False,
    since a sync per batch would stall the queue the host keeps ahead of the GPU.
    """

    def __init__(self, device: torch.device, exact: bool = False):
        self.device, self.exact, self.waited = device, exact, 0.0

    def next(self, batches: Iterator[Batch]) -> Batch:
        if self.exact:
            sync(self.device)
        start = time.perf_counter()
        batch = next(batches)
        if self.exact:
            sync(self.device)
        self.waited += time.perf_counter() - start
        return batch


def optimizer_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterator[Batch],
    *,
    accum: int,
    lr: float,
    sums: torch.Tensor,
    backward,
    no_sync,
    clock: LoaderClock,
    beat: Callable[[], None] = lambda: None,
    sync_gradients: bool = True,
    label_smoothing: float = 0.0,
    ema: ModelEmaV3 | None = None,
    mixup: Mixup | None = None,
) -> None:
    """One optimizer step of the run: `accum` micro-batches from `batches`, the learning rate `lr`, the update.

    `sums` (LOSS_SUM, CORRECT, COUNT) gains each micro-batch's step_counts. sync_gradients=False runs
    the last micro-batch under no_sync too (no all-reduce): `bench train` times that to find what
    communication costs. `beat` tells the hang watchdog after each micro-batch that the rank lives.
    Each parameter group's rate is `lr` x its `lr_scale` (optim.head_lr_mult's groups); `ema`
    (model.ema) averages the updated weights in, on every rank (DDP keeps the parameters equal). `mixup`
    (build_mixup) mixes each micro-batch; train accuracy then counts against the mixed target's argmax.
    """
    for micro in range(accum):
        images, labels = clock.next(batches)
        last = micro == accum - 1
        targets = labels if mixup is None else mix(mixup, images, labels)[1]
        logits, loss = micro_step(
            model, images, targets, backward, accum, last and sync_gradients, no_sync, label_smoothing
        )
        sums += step_counts(loss, logits, labels if mixup is None else targets.argmax(1))
        beat()
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"] if "lr_scale" in group else lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)  # host-only (set_to_none)
    if ema is not None:
        ema.update(model)  # by state-dict order, so a DDP or compiled wrapper's prefixed names do not matter


def one_batch_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    backward=torch.Tensor.backward,
) -> torch.Tensor:
    """optimizer_step on one given batch at the optimizer's learning rate, without a loader; returns its step_counts.

    For what times or checks the step alone: `bench step`, the GPU check's sync test, the sync_bn
    benchmark. `backward` is Accelerate's under DDP or mixed precision.
    """
    sums = torch.zeros(3, dtype=torch.float64, device=images.device)
    optimizer_step(
        model,
        optimizer,
        iter([(images, labels)]),
        accum=1,
        lr=optimizer.param_groups[0]["lr"],
        sums=sums,
        backward=backward,
        no_sync=None,
        clock=LoaderClock(images.device),
    )
    return sums


def evaluation_model(prepared: torch.nn.Module, bare: torch.nn.Module, compile_kwargs: dict) -> torch.nn.Module:
    """The model evaluation runs: `bare` (no DDP: no hooks, no collectives, so a rank without a val
    batch cannot hang the others), compiled on its own when `prepared` is compiled.

    Not accelerator.unwrap_model(prepared): for a compiled model it returns the compiled wrapper,
    whose forward still calls DDP's, and rewires that wrapper's _orig_mod as a side effect.
    """
    return torch.compile(bare, **compile_kwargs) if is_compiled_module(prepared) else bare


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 over every parameter and buffer, in state-dict order."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def endless(loader) -> Iterator[Batch]:
    """The loader's training batches over epoch after epoch (benchmarks and checks that count steps, not epochs)."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1
