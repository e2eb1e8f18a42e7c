"""The typed, strict experiment config: YAML in, dataclasses out, unknown keys are errors."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from .errors import ConfigError


@dataclass
class DataConfig:
    root: str = "data/flowers"
    """Data set folder holding train/ and val/, each with one sub-folder per class."""
    loader: Literal["torch", "dali", "auto"] = "auto"
    """Which loader feeds the model; all yield the same contract."""
    image_size: int = 224
    """Side of the square training and evaluation crops, in pixels."""
    eval_crop_ratio: float = 0.875
    """Evaluation resizes the shorter side to image_size / ratio, then centre-crops (224/0.875 = 256)."""
    scale: tuple[float, float] = (0.08, 1.0)
    """Random-resized-crop area range, as fractions of the image."""
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    """Random-resized-crop aspect-ratio range."""
    hflip: float = 0.5
    """Probability of a horizontal flip."""
    rotation: float = 0.0
    """Maximum random rotation, in degrees (0 = off)."""
    color_jitter: float = 0.0
    """Brightness, contrast and saturation jitter strength (0 = off)."""
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    """Per-channel mean used to normalise, on the device."""
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    """Per-channel standard deviation used to normalise, on the device."""
    num_workers: int = -1
    """Decode workers per process (DALI: CPU threads); -1 = the cores available to each local process."""
    hw_decoder_load: float = -1.0
    """DALI on a GPU: share of JPEGs sent to the hardware JPEG decoder (A100/H100/H200), the rest
    to nvJPEG's CUDA decoder; -1 = DALI's default (0.65 or 0.9 depending on the DALI version)."""
    check: bool = True
    """Check every file once before training (cached) and give the loaders only those that decode;
    false = trust the folder (the PyTorch loader still skips unreadable files, DALI stops on one)."""
    check_cache: str = ""
    """File caching the check by path, size and mtime; empty = in the data root if writable, else ~/.cache/flowers-dist."""
    stage_to: str = ""
    """Node-local folder (e.g. $SLURM_TMPDIR, a local NVMe) to copy a packed data.root to once per node, verified,
    and train from; environment variables are expanded; a requeue on the node reuses the copy; empty = off."""
    max_pixels: int = 64_000_000
    """Images with more pixels are skipped (a decompression-bomb guard); at most PIL's hard limit, 178,956,970."""
    min_side: int = 16
    """Images with a side shorter than this, in pixels, are skipped (a 1x1 placeholder carries no content)."""
    progressive_min_size: int = 0
    """Lever, progressive resizing (data/resolution.py): training crops start at this side and grow to image_size
    (evaluation stays at image_size); 0 = off."""
    progressive_start_epoch: int = 0
    """Progressive resizing: the last epoch (0-based) at progressive_min_size; the crops grow after it."""
    progressive_end_epoch: int = 0
    """Progressive resizing: the first epoch (0-based) at image_size."""
    progressive_step: int = 32
    """Progressive resizing: the sides in between are rounded to multiples of this (FFCV's 32)."""

    def validate(self) -> None:
        _check(self.image_size >= 16, "data.image_size", f"must be >= 16, got {self.image_size}")
        _check(0 < self.eval_crop_ratio <= 1, "data.eval_crop_ratio", f"must be in (0, 1], got {self.eval_crop_ratio}")
        _check(
            0 < self.scale[0] <= self.scale[1] <= 1,
            "data.scale",
            f"must satisfy 0 < lo <= hi <= 1, got {list(self.scale)}",
        )
        _check(0 < self.ratio[0] <= self.ratio[1], "data.ratio", f"must satisfy 0 < lo <= hi, got {list(self.ratio)}")
        _check(0 <= self.hflip <= 1, "data.hflip", f"must be a probability, got {self.hflip}")
        _check(0 <= self.rotation <= 180, "data.rotation", f"must be in [0, 180] degrees, got {self.rotation}")
        _check(0 <= self.color_jitter <= 1, "data.color_jitter", f"must be in [0, 1], got {self.color_jitter}")
        _check(all(s > 0 for s in self.std), "data.std", f"must be positive, got {list(self.std)}")
        _check(self.num_workers >= -1, "data.num_workers", f"must be -1 (auto) or >= 0, got {self.num_workers}")
        _check(
            self.hw_decoder_load == -1 or 0 <= self.hw_decoder_load <= 1,
            "data.hw_decoder_load",
            f"must be -1 (DALI's default) or in [0, 1], got {self.hw_decoder_load}",
        )
        _check(
            0 < self.max_pixels <= 178_956_970,
            "data.max_pixels",
            f"must be in [1, 178956970] (PIL's limit), got {self.max_pixels}",
        )
        _check(self.min_side >= 1, "data.min_side", f"must be >= 1, got {self.min_side}")
        if self.progressive_min_size:
            _check(
                16 <= self.progressive_min_size < self.image_size,
                "data.progressive_min_size",
                f"must be 0 (off) or in [16, data.image_size={self.image_size}), got {self.progressive_min_size}",
            )
            _check(
                0 <= self.progressive_start_epoch < self.progressive_end_epoch,
                "data.progressive_end_epoch",
                "must be above data.progressive_start_epoch (>= 0), got "
                f"{self.progressive_start_epoch} and {self.progressive_end_epoch}",
            )
            _check(self.progressive_step >= 1, "data.progressive_step", f"must be >= 1, got {self.progressive_step}")

    @property
    def eval_resize(self) -> int:
        return round(self.image_size / self.eval_crop_ratio)


@dataclass
class ModelConfig:
    name: str = "resnet18.tv_in1k"
    """Any timm model name; `arch.tag` picks a pretrained tag (tv_in1k = torchvision's ImageNet weights)."""
    pretrained: str = "imagenet"
    """`imagenet` (timm's weights, downloaded or cached), `none`, or a path to a local state-dict file."""
    channels_last: bool = False
    """Keep weights and activations in NHWC; faster with mixed precision on tensor cores."""
    compile: bool = False
    """torch.compile (inductor) through Accelerate for training and evaluation: a minute of compiling
    on the CPU, then faster steps; pays off on GPUs over whole runs (measure with `bench step --compile`)."""
    zero_init_last: bool = True
    """From scratch: start each residual block's last BatchNorm weight at zero (timm's default for ResNets);
    false keeps PyTorch's default of one, which learns faster from scratch (see README); ImageNet weights overwrite it."""
    sync_bn: Literal["off", "on", "auto"] = "auto"
    """BatchNorm statistics over the global batch instead of each process's share (sync_bn.py); `auto`:
    when several processes each hold fewer than 16 images per micro-batch."""
    ema: float = 0.0
    """Lever: decay of an exponential moving average of the weights (timm's ModelEmaV3, updated after every optimizer
    step, buffers included), evaluated beside the weights (`val_acc_ema`) and checkpointed; 0 = off, e.g. 0.999."""

    def validate(self) -> None:
        _check(bool(self.name.strip()), "model.name", "must not be empty")
        _check(0 <= self.ema < 1, "model.ema", f"must be in [0, 1) (0 = off), got {self.ema}")
        _check(bool(self.pretrained.strip()), "model.pretrained", "must be imagenet, none or a file path")


@dataclass
class OptimConfig:
    lr: float = 1e-3
    """Learning rate after warm-up; for optim.reference_batch_size images per step when optim.lr_scaling=linear."""
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 0.0
    """L2 weight decay."""
    nesterov: bool = False
    """Use Nesterov momentum."""
    schedule: Literal["step", "cosine", "constant", "onecycle"] = "step"
    """Learning-rate schedule (a pure function of the step, see schedule.py); `onecycle`: torch's OneCycleLR shape."""
    step_size: int = 7
    """StepLR: decay every this many epochs."""
    gamma: float = 0.1
    """StepLR: multiply the learning rate by this at each decay."""
    warmup_epochs: int = 0
    """Linear warm-up, per optimizer step, from lr/10 over this many epochs (large global batches)."""
    warmup_steps: int = 0
    """Linear warm-up from lr/10 over this many optimizer steps (instead of optim.warmup_epochs)."""
    lr_scaling: Literal["none", "linear"] = "none"
    """`linear`: the rate used is lr x train.global_batch_size / optim.reference_batch_size (Goyal et al. 2017)."""
    reference_batch_size: int = 32
    """The global batch optim.lr was tuned for (the recipe's 32); used by optim.lr_scaling=linear."""
    label_smoothing: float = 0.0
    """Lever: cross-entropy label smoothing of the training loss (torch's); `train_loss` is the smoothed loss, the
    evaluation loss stays unsmoothed; 0 = off."""
    no_decay_norm_bias: bool = False
    """Lever: no weight decay on norm weights and biases (timm's param_groups_weight_decay: 1-d tensors and `.bias`)."""
    head_lr_mult: float = 1.0
    """Lever: the classifier head's (timm's get_classifier()) learning rate is the schedule's x this; 1 = off."""
    mixup_alpha: float = 0.0
    """Lever: timm's Mixup on each micro-batch with Beta(alpha, alpha) weights (one per micro-batch); 0 = off."""
    cutmix_alpha: float = 0.0
    """Lever: timm's CutMix on each micro-batch, Beta(alpha, alpha) areas; 0 = off; with mixup_alpha both, switched."""
    mixup_prob: float = 1.0
    """Mixup/CutMix: the probability that a micro-batch is mixed at all."""
    mixup_switch_prob: float = 0.5
    """Mixup/CutMix, both on: the probability that a mixed micro-batch takes CutMix rather than Mixup."""
    onecycle_pct_start: float = 0.3
    """optim.schedule=onecycle: the share of the run's steps spent rising to optim.lr (torch's pct_start)."""
    onecycle_div_factor: float = 25.0
    """optim.schedule=onecycle: the rate starts at optim.lr / this (torch's div_factor)."""
    onecycle_final_div_factor: float = 1e4
    """optim.schedule=onecycle: the rate ends at the start rate / this (torch's final_div_factor)."""

    def validate(self) -> None:
        _check(self.lr > 0, "optim.lr", f"must be > 0, got {self.lr}")
        _check(0 <= self.momentum < 1, "optim.momentum", f"must be in [0, 1), got {self.momentum}")
        _check(self.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(self.step_size >= 1, "optim.step_size", f"must be >= 1, got {self.step_size}")
        _check(0 < self.gamma <= 1, "optim.gamma", f"must be in (0, 1], got {self.gamma}")
        _check(self.warmup_epochs >= 0, "optim.warmup_epochs", f"must be >= 0, got {self.warmup_epochs}")
        _check(self.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        _check(
            not (self.warmup_steps and self.warmup_epochs),
            "optim.warmup_steps",
            f"set it or optim.warmup_epochs, not both (got {self.warmup_steps} and {self.warmup_epochs})",
        )
        _check(
            self.reference_batch_size >= 1,
            "optim.reference_batch_size",
            f"must be >= 1, got {self.reference_batch_size}",
        )
        _check(not self.nesterov or self.momentum > 0, "optim.nesterov", "needs optim.momentum > 0")
        _check(
            0 <= self.label_smoothing < 1,
            "optim.label_smoothing",
            f"must be in [0, 1) (0 = off), got {self.label_smoothing}",
        )
        _check(self.head_lr_mult > 0, "optim.head_lr_mult", f"must be > 0 (1 = off), got {self.head_lr_mult}")
        for key in ("mixup_alpha", "cutmix_alpha"):
            _check(getattr(self, key) >= 0, f"optim.{key}", f"must be >= 0 (0 = off), got {getattr(self, key)}")
        for key in ("mixup_prob", "mixup_switch_prob"):
            _check(0 <= getattr(self, key) <= 1, f"optim.{key}", f"must be in [0, 1], got {getattr(self, key)}")
        _check(
            0 < self.onecycle_pct_start < 1,
            "optim.onecycle_pct_start",
            f"must be in (0, 1), got {self.onecycle_pct_start}",
        )
        for key in ("onecycle_div_factor", "onecycle_final_div_factor"):
            _check(getattr(self, key) > 0, f"optim.{key}", f"must be > 0, got {getattr(self, key)}")
        _check(
            self.schedule != "onecycle" or not (self.warmup_steps or self.warmup_epochs),
            "optim.schedule",
            "onecycle has its own warm-up (optim.onecycle_pct_start); leave optim.warmup_steps and warmup_epochs at 0",
        )


@dataclass
class TrainConfig:
    epochs: int = 25
    """Number of epochs."""
    global_batch_size: int = 32
    """Images per optimizer step over all processes: micro batch x processes x train.grad_accum_steps."""
    micro_batch_size: int = 0
    """Images per process in one forward/backward; 0 = derived: global batch / (processes x train.grad_accum_steps)."""
    grad_accum_steps: int = 0
    """Micro-batches whose gradients are summed into one optimizer step; 0 = derived from train.micro_batch_size (1 if unset)."""
    eval_batch_size: int = 64
    """Images per evaluation batch and process."""
    max_steps_per_epoch: int = 0
    """Cut each training epoch after this many steps (0 = full epoch); for smoke tests."""
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    """Autocast precision; fp16 needs a GPU (on the CPU it would silently run fp32)."""
    device: Literal["auto", "cpu"] = "auto"
    """`auto` uses CUDA when present; `cpu` forces the CPU even on a GPU host."""
    seed: int = 0
    """Seed for weights of new layers, data order and augmentation."""
    log_every: int = 10
    """Steps between metric read-backs (each is a device sync): progress bar, `step` rows of metrics.jsonl, W&B."""
    output_dir: str = "runs"
    """Folder that holds one sub-folder per run."""
    name: str = ""
    """Run name; empty = under SLURM `<job name>-<job id>`, else config name, timestamp and a random tag."""
    progress: Literal["auto", "bar", "lines"] = "auto"
    """Progress bar (`bar`), one line per epoch (`lines`), or bar only on a terminal (`auto`)."""
    resume: Literal["auto", "never"] = "auto"
    """`auto`: a run folder holding a checkpoint that verifies is resumed, one holding none is started (the same
    command serves the first start and every requeue); `never`: an existing run folder is an error."""
    checkpoint_every_steps: int = 0
    """Also checkpoint every this many optimizer steps, mid-epoch (0 = only at epoch ends and on a stop signal)."""
    checkpoint_every_minutes: float = 0.0
    """Also checkpoint when this many minutes have passed since the last checkpoint (0 = off)."""
    keep_checkpoints: int = 2
    """Checkpoint files kept besides last.pt and best.pt (the newest step-*.pt; older ones are deleted)."""
    stop_check_every: int = 10
    """Steps between the ranks' agreement on stop signals, time-based checkpoints and failed writes (one small all-reduce)."""
    collective_timeout: float = 600.0
    """Seconds a collective (all-reduce, broadcast) may wait for a peer before the run fails (handed to the process group)."""
    watchdog: float = 900.0
    """Seconds without a finished training step or eval batch before a rank gives up with exit code 69 (0 = off)."""
    cudnn_benchmark: bool = True
    """On CUDA, let cuDNN time its convolution algorithms once per input shape and keep the fastest (fixed-size batches)."""
    record_samples: bool = False
    """Audit: write, per epoch and rank, the samples trained (a pack's keys, a folder's relative paths) to
    <run>/samples/epoch-EEE.rank-R.from-SSSSSS.txt (one file per part of an epoch a process trained, from step S)."""
    eval_hflip_tta: bool = False
    """Lever: evaluation averages the logits of each image and its horizontal flip (on the batch: both loaders)."""

    def validate(self) -> None:
        _check(self.epochs >= 1, "train.epochs", f"must be >= 1, got {self.epochs}")
        _check(self.global_batch_size >= 1, "train.global_batch_size", f"must be >= 1, got {self.global_batch_size}")
        _check(self.eval_batch_size >= 1, "train.eval_batch_size", f"must be >= 1, got {self.eval_batch_size}")
        _check(
            self.max_steps_per_epoch >= 0, "train.max_steps_per_epoch", f"must be >= 0, got {self.max_steps_per_epoch}"
        )
        _check(
            self.micro_batch_size >= 0,
            "train.micro_batch_size",
            f"must be >= 0 (0 = derived), got {self.micro_batch_size}",
        )
        _check(
            self.grad_accum_steps >= 0,
            "train.grad_accum_steps",
            f"must be >= 0 (0 = derived), got {self.grad_accum_steps}",
        )
        if self.micro_batch_size and self.grad_accum_steps:
            _check(
                self.global_batch_size % (self.micro_batch_size * self.grad_accum_steps) == 0,
                "train.micro_batch_size",
                f"{self.micro_batch_size} x train.grad_accum_steps {self.grad_accum_steps} does not divide "
                f"train.global_batch_size {self.global_batch_size}",
            )
        _check(self.log_every >= 1, "train.log_every", f"must be >= 1, got {self.log_every}")
        _check("/" not in self.name, "train.name", f"must not contain '/', got {self.name!r}")
        _check(
            self.checkpoint_every_steps >= 0,
            "train.checkpoint_every_steps",
            f"must be >= 0, got {self.checkpoint_every_steps}",
        )
        _check(
            self.checkpoint_every_minutes >= 0,
            "train.checkpoint_every_minutes",
            f"must be >= 0, got {self.checkpoint_every_minutes}",
        )
        _check(self.keep_checkpoints >= 1, "train.keep_checkpoints", f"must be >= 1, got {self.keep_checkpoints}")
        _check(self.stop_check_every >= 1, "train.stop_check_every", f"must be >= 1, got {self.stop_check_every}")
        _check(
            self.collective_timeout > 0,
            "train.collective_timeout",
            f"must be > 0 seconds, got {self.collective_timeout}",
        )
        _check(self.watchdog >= 0, "train.watchdog", f"must be >= 0 seconds (0 = off), got {self.watchdog}")

    def batch_split(self, world_size: int) -> tuple[int, int]:
        """(micro batch per process, accumulation steps) for `world_size` processes, with
        global batch = micro x processes x accumulation; whichever of the two is 0 is derived."""
        g, micro, accum = self.global_batch_size, self.micro_batch_size, self.grad_accum_steps
        if micro and accum:
            _check(
                micro * world_size * accum == g,
                "train.global_batch_size",
                f"{g} != train.micro_batch_size {micro} x {world_size} processes x train.grad_accum_steps {accum}",
            )
        elif micro:
            _check(
                g % (micro * world_size) == 0,
                "train.micro_batch_size",
                f"{micro} x {world_size} processes does not divide train.global_batch_size {g}",
            )
            accum = g // (micro * world_size)
        else:
            accum = accum or 1
            _check(
                g % (world_size * accum) == 0,
                "train.global_batch_size",
                f"{g} does not split evenly over {world_size} processes x train.grad_accum_steps {accum}",
            )
            micro = g // (world_size * accum)
        return micro, accum


@dataclass
class TrackingConfig:
    wandb: Literal["auto", "online", "offline", "disabled"] = "auto"
    """W&B mode; `auto` = online when credentials exist (WANDB_API_KEY or netrc), else offline (sync later)."""
    project: str = "flowers-dist"
    """W&B project."""
    entity: str = ""
    """W&B entity (user or team); empty = the account's default."""
    tags: tuple[str, ...] = ()
    """W&B run tags."""
    group: str = ""
    """W&B run group (e.g. one sweep or one comparison); empty = none."""
    job_type: str = ""
    """W&B job_type of the run (`flowers-dist sweep` sets `sweep`); empty = W&B's default."""
    target_accuracy: float = 0.92
    """Report the time at which val accuracy first reaches this (time-to-accuracy)."""
    mistakes: int = 64
    """The most confident wrong val predictions kept at the end of training (report/mistakes.html, W&B); 0 = off."""
    artifacts: Literal["none", "best", "all"] = "best"
    """Checkpoints in W&B: best = upload best.pt at each new best epoch; all = also every step file by reference (no upload)."""

    def validate(self) -> None:
        _check(bool(self.project.strip()), "tracking.project", "must not be empty")
        _check(all(t.strip() for t in self.tags), "tracking.tags", f"must not hold empty tags, got {list(self.tags)}")
        _check(
            0 < self.target_accuracy <= 1, "tracking.target_accuracy", f"must be in (0, 1], got {self.target_accuracy}"
        )
        _check(self.mistakes >= 0, "tracking.mistakes", f"must be >= 0 (0 = off), got {self.mistakes}")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def validate(self) -> None:
        for section in dataclasses.fields(self):
            getattr(self, section.name).validate()

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))


LEVERS: dict[str, Any] = {
    "optim.label_smoothing": 0.0,
    "optim.no_decay_norm_bias": False,
    "optim.head_lr_mult": 1.0,
    "optim.mixup_alpha": 0.0,
    "optim.cutmix_alpha": 0.0,
    "optim.schedule": "step",
    "optim.warmup_epochs": 0,
    "optim.warmup_steps": 0,
    "model.ema": 0.0,
    "train.eval_hflip_tta": False,
    "data.progressive_min_size": 0,
}
"""The time-to-accuracy levers (issue 19) and their off values, the seed recipe's: what a run's record lists as on."""


def dotted(cfg: Config) -> dict[str, Any]:
    """Every key of the config as {`section.key`: value}, the names overrides use."""
    return {f"{section}.{key}": v for section, keys in cfg.to_dict().items() for key, v in keys.items()}


def levers_on(cfg: Config) -> dict[str, Any]:
    """The levers this config turns on, as {dotted key: value} (environment.json, the start line, bench's JSON)."""
    values = dotted(cfg)
    return {key: values[key] for key, off in LEVERS.items() if values[key] != off}


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}': {message}")


def _plain(value: Any) -> Any:
    """Tuples become lists so the YAML we write reads back as the YAML a user writes."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class ConfigLoader(yaml.SafeLoader):
    """YAML as PyYAML's safe loader reads it, except that only true/false are booleans (YAML 1.2's rule).

    YAML 1.1 also reads yes/no/on/off as booleans, so `train.mixed_precision=no` would arrive as False
    and `model.sync_bn: off` as a bool. Kept as the text typed, every documented choice reads as
    written; a true/false key still accepts yes/no/on/off (YAML11_BOOLEANS).
    """


_BOOL_TAG = "tag:yaml.org,2002:bool"
ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
ConfigLoader.add_implicit_resolver(_BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))

YAML11_BOOLEANS = {
    word: truth
    for words, truth in (("yes Yes YES on On ON", True), ("no No NO off Off OFF", False))
    for word in words.split()
}
"""The spellings YAML 1.1 reads as booleans, which ConfigLoader leaves as text; a true/false key takes them."""


YAML12_EXPONENT = re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$")


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check one value against its annotation; ints are accepted where floats are expected."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if isinstance(value, bool) or value not in choices:  # True == 1: a bool must not pass as a choice
            raise ConfigError(f"config key '{key}': must be one of {', '.join(map(str, choices))}; got {value!r}")
        return value
    if origin is tuple:
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:  # tuple[str, ...]: any length
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"config key '{key}': must be a list; got {value!r}")
            return tuple(_coerce(v, args[0], key) for v in value)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"config key '{key}': must be a list of {len(args)} numbers; got {value!r}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if origin in (Union, types.UnionType):
        raise TypeError(f"unsupported annotation for {key}")  # keep the schema simple on purpose
    if hint is bool:
        if isinstance(value, str) and value in YAML11_BOOLEANS:  # the loader keeps yes/no/on/off as typed
            return YAML11_BOOLEANS[value]
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}': must be true or false; got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}': must be an integer; got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str) and YAML12_EXPONENT.match(value):
            return float(value)  # YAML 1.1 reads 5e-4 (no decimal point) as text; YAML 1.2 and a user, as a number
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}': must be a number; got {value!r}")
        return float(value)
    if hint is str:
        if value is None:
            return ""
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"config key '{key}': must be a string; got {value!r}")
        return str(value)
    raise TypeError(f"unsupported annotation {hint!r} for {key}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        where = f"section '{prefix}'" if prefix else "the top level"
        raise ConfigError(f"config {where} must be a mapping of keys to values; got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"config key '{full}' is unknown (known here: {known})")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, full)
        else:
            kwargs[key] = _coerce(value, hint, full)
    return cls(**kwargs)


def from_dict(data: dict[str, Any]) -> Config:
    cfg = _build(Config, data, "")
    cfg.validate()
    return cfg


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` strings (values parsed as YAML) to a raw config mapping."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value")
        dotted, raw = item.split("=", 1)
        parts = dotted.strip().split(".")
        if len(parts) != 2 or not all(parts):
            raise ConfigError(f"override key '{dotted}' must be section.key (e.g. optim.lr=0.01)")
        section, key = parts
        try:
            value = yaml.load(raw, ConfigLoader) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override '{item}': value is not valid YAML ({yaml_problem(exc)})") from None
        current = data.setdefault(section, {})
        if not isinstance(current, dict):
            raise ConfigError(f"config section '{section}' must be a mapping")
        current[key] = value
    return data


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.load(path.read_text(), ConfigLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {yaml_problem(exc)}") from None
    return data or {}


def yaml_problem(exc: yaml.YAMLError) -> str:
    """`line L, column C: what` from a YAML error (PyYAML counts from 0; editors count from 1)."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context, start = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    if context and start is not None and start is not mark:  # e.g. where an unclosed bracket opened
        context += f" started at line {start.line + 1}, column {start.column + 1}"
    return where + problem + (f" ({context})" if context else "")


def load(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML config (or the defaults when path is None), apply overrides, validate."""
    data = read_yaml(path) if path is not None else {}
    return from_dict(apply_overrides(data, list(overrides)))


def dump(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
