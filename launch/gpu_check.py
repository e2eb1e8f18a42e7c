"""The first GPU run of the DALI path: checks and honest figures, every one beside its goal in one table.

Run by launch/gpu_check.sh after its pre-flight (launch/gpu_preflight.py), from the project root:

    python launch/gpu_check.py [--data .gpu_carry] [--batch 256] [--window 5] [--repeats 3] [--dry-run] [--out DIR]

It prints its own estimate of its duration first and one table last: every check and every
figure beside its goal (docs/gpu-check.md). --dry-run runs every step that needs no CUDA, on
the CPU at tiny sizes, so that a typo cannot cost device time. Exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

# Goals: the targets for one H200 at 224 px, and the check's own time limit.
GOAL_IMAGES_PER_S = 10_000
GOAL_RECIPE_S = 15.0
GOAL_CHECK_S = 600.0
# The 25-epoch recipe (configs/flowers_resnet18.yaml) on flower_photos' 80/20 split.
RECIPE_EPOCHS, RECIPE_TRAIN_IMAGES, RECIPE_BATCH = 25, 2934, 32
# nvJPEG (fancy upsampling) against libjpeg-turbo: DALI's own decoder test allows a mean absolute
# difference below 1 grey level; the GPU evaluation pipeline against the CPU one, normalised units.
DECODE_MEAN_TOL, EVAL_MEAN_TOL = 1.0, 0.02
# The slowest rate the duration estimate assumes (a third of the goal), so the estimate errs long.
ESTIMATE_IMAGES_PER_S = 3_000


# ---------------------------------------------------------------------------------------------- the run


@dataclasses.dataclass
class Row:
    check: str
    value: str
    goal: str
    status: str  # ok, FAIL, info, skipped


class Table:
    def __init__(self) -> None:
        self.rows: list[Row] = []

    def add(self, check: str, value: str, goal: str = "", status: str = "info") -> None:
        self.rows.append(Row(check, value, goal, status))
        print(f"gpu_check: {check}: {value}" + (f"  [goal {goal}]" if goal else "") + f"  {status}", flush=True)

    def check(self, check: str, ok: bool, value: str, goal: str) -> None:
        self.add(check, value, goal, "ok" if ok else "FAIL")

    def render(self) -> str:
        head = Row("check", "value", "goal", "status")
        widths = [max(len(getattr(r, f)) for r in [head, *self.rows]) for f in ("check", "value", "goal")]
        lines = []
        for r in [head, *self.rows]:
            lines.append(f"  {r.check:<{widths[0]}}  {r.value:<{widths[1]}}  {r.goal:<{widths[2]}}  {r.status}")
        return "\n".join(lines)

    @property
    def failed(self) -> list[Row]:
        return [r for r in self.rows if r.status == "FAIL"]


@dataclasses.dataclass
class Plan:
    """Sizes of every stage: the GPU's, or tiny ones for the dry run on the CPU."""

    dry: bool
    batch: int
    window: float
    repeats: int
    image_size: int
    e2e_epochs: int

    @classmethod
    def make(cls, args: argparse.Namespace) -> Plan:
        if args.dry_run:
            return cls(True, batch=8, window=0.3, repeats=2, image_size=32, e2e_epochs=2)
        return cls(False, batch=args.batch, window=args.window, repeats=args.repeats, image_size=224, e2e_epochs=4)

    def e2e_log_every(self, batch: int) -> int:
        """Steps per logged window: at least `window` seconds at the goal rate."""
        return 2 if self.dry else max(1, -(-int(self.window * GOAL_IMAGES_PER_S) // batch))

    def estimate(self, num_val: int) -> dict[str, float]:
        """Seconds per stage on an H200, with ESTIMATE_IMAGES_PER_S wherever the rate is not known."""
        loaders = 3 * (self.repeats * self.window + 10)
        decoder = 2 * self.repeats * self.window + 10
        e2e = 0.0
        for batch in (self.batch, RECIPE_BATCH):
            images = self.e2e_epochs * self.e2e_log_every(batch) * batch * 1.02
            e2e += 20 + images / ESTIMATE_IMAGES_PER_S + self.e2e_epochs * num_val / ESTIMATE_IMAGES_PER_S
        return {
            "imports and set-up": 20,
            "decode parity": 15,
            "eval parity": 15,
            "delayed read": 15,
            "HW decoder": decoder,
            "sync-free steps": 25,
            "loader windows": loaders,
            "end-to-end runs": e2e,
            "start-up runs": 2 * 25,
        }


def _device(plan: Plan):
    import torch

    return torch.device("cpu") if plan.dry else torch.device("cuda", torch.cuda.current_device())


@contextlib.contextmanager
def _stderr_captured():
    """Capture file descriptor 2 (C libraries log there, below Python's sys.stderr); yields a list that receives the text."""
    out: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield out
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            out.append(tmp.read().decode(errors="replace"))
            sys.stderr.write(out[0])


def rate_windows(next_images, device, seconds: float, repeats: int, warmup: int = 4) -> list[float]:
    """Images/s over `repeats` back-to-back windows of at least `seconds`, after `warmup` calls.

    Windows follow each other without a pause, so DALI's prefetch queue is as full when a window
    opens as when it closes: the batches it held at the start are matched by those it holds at
    the end. (Timing from a pause, the queue fills while idle and the first window gets its
    contents for free; the old figures were up to ~10% high that way.)
    """
    from flowers_dist.steps import sync

    for _ in range(warmup):
        next_images()
    rates = []
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        images = 0
        while time.perf_counter() - start < seconds:
            images += next_images()
        sync(device)  # the last batch has arrived: the window's end
        now = time.perf_counter()
        rates.append(images / (now - start))
        start = now
    return rates


def _spread(rates: list[float]) -> str:
    return f"{statistics.median(rates):,.0f} img/s (range {min(rates):,.0f}-{max(rates):,.0f}, {len(rates)} windows)"


def decode_parity(files: list[str], device) -> dict:
    """Per-image mean and max |mixed - cpu| over the files, with and without fancy upsampling."""
    import numpy as np
    from nvidia.dali import fn, pipeline_def, types

    gpu_device = "cpu" if device.type == "cpu" else "mixed"  # the dry run compares the CPU decoder with itself

    @pipeline_def
    def both(fancy: bool):
        jpegs, _ = fn.readers.file(files=files, random_shuffle=False, name="Reader")
        gpu = fn.decoders.image(
            jpegs,
            device=gpu_device,
            output_type=types.RGB,
            **({"jpeg_fancy_upsampling": fancy} if gpu_device == "mixed" else {}),
        )
        cpu = fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)
        return gpu, cpu

    out = {}
    for fancy in (True, False):
        pipe = both(
            fancy=fancy, batch_size=len(files), num_threads=4, device_id=None if device.type == "cpu" else device.index
        )
        pipe.build()
        gpu, cpu = pipe.run()
        gpu = gpu.as_cpu() if hasattr(gpu, "as_cpu") else gpu
        diffs = [np.abs(np.array(g, dtype=np.int16) - np.array(c, dtype=np.int16)) for g, c in zip(gpu, cpu)]
        out[fancy] = dict(mean=max(float(d.mean()) for d in diffs), max=max(int(d.max()) for d in diffs))
        del pipe
    return out


def eval_parity(cfg, split, device) -> float:
    """Largest per-image mean |device - CPU| of the production evaluation loader, normalised units."""
    import torch

    from flowers_dist.data import Placement, build_loader

    def images(dev) -> torch.Tensor:
        loader = build_loader(cfg, split, train=False, batch_size=16, placement=Placement(0, 1, dev, workers=4), seed=0)
        return torch.cat([x.float().cpu() for x, _ in loader])

    a, b = images(device), images(torch.device("cpu"))
    return float((a - b).abs().mean(dim=(1, 2, 3)).max())


def delayed_read(cfg, split, device, batch: int, zero_copy: bool = False) -> dict:
    """Take a batch, sum it, stall torch's stream, drop the batch, advance the loader, sum again after the stall.

    If the loader's memory went back to DALI when the batch was dropped, DALI's next outputs
    overwrite it before the stalled stream reads it, and the sums differ. zero_copy=True builds
    the loader as DALI 2.4 does by default (exec_dynamic views), to show the check can see it.
    """
    import torch

    from flowers_dist.data import Placement
    from flowers_dist.data import dali as dali_module
    from flowers_dist.steps import endless

    saved = dali_module.OWN_THE_BATCH
    if zero_copy:
        dali_module.OWN_THE_BATCH = dict(exec_dynamic=True)
    try:
        loader = dali_module.build_dali_loader(cfg, split, True, batch, Placement(0, 1, device, workers=4), seed=0)
    finally:
        dali_module.OWN_THE_BATCH = saved
    batches = endless(loader)
    images, _ = next(batches)
    on_gpu = device.type == "cuda"
    if on_gpu:
        stalled, read = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    first = images.double().sum()
    if on_gpu:
        stalled.record()
        torch.cuda._sleep(
            4_000_000_000
        )  # ~2 s of GPU clock cycles on torch's stream (the read must come after the advance)
    late = images.double().sum()  # queued now, runs after the stall
    if on_gpu:
        read.record()
    del images  # the loop drops a batch while the GPU has yet to read it
    host = time.perf_counter()
    for _ in range(8):
        next(batches)  # DALI decodes and stores its next outputs meanwhile
    host = time.perf_counter() - host
    if on_gpu:
        torch.cuda.synchronize(device)
    delay = stalled.elapsed_time(read) / 1000 if on_gpu else 0.0
    return {"equal": bool(torch.equal(first, late)), "read_delay_s": delay, "host_advance_s": host}


def sync_free_steps(precision: str, device, num_classes: int, batch: int, size: int = 64) -> str | None:
    """The loop's train step (through an Accelerator in this precision, fused SGD), its counts and evaluation under sync-debug mode.

    A host-device sync per step (a .item(), a copy from the host, CUDA's bincount, GradScaler's
    found_inf read) stops the host from queueing work ahead of the GPU. Returns the first sync's
    message, or None. The dry run runs the same steps without the mode (it is CUDA's).
    """
    import torch
    from accelerate.state import AcceleratorState, GradientState

    from flowers_dist.config import ModelConfig, OptimConfig
    from flowers_dist.distributed import make_accelerator
    from flowers_dist.evaluate import local_counts
    from flowers_dist.model import build_model
    from flowers_dist.steps import build_optimizer, one_batch_step

    AcceleratorState._reset_state(True)  # each precision gets its own Accelerator in this one process
    GradientState._reset_state()
    accelerator = make_accelerator("auto" if device.type == "cuda" else "cpu", precision)
    model = build_model(ModelConfig(pretrained="none", channels_last=True), num_classes)
    optimizer = build_optimizer(OptimConfig(lr=0.01), model, fused=device.type == "cuda")
    model, optimizer = accelerator.prepare(model, optimizer)
    batches = [
        (
            torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last),
            torch.randint(0, num_classes, (batch,), device=device),
        )
        for _ in range(3)
    ]
    sums = torch.zeros(3, dtype=torch.float64, device=device)

    def run() -> None:
        model.train()
        for images, labels in batches:
            sums.add_(one_batch_step(model, optimizer, images, labels, accelerator.backward))
        with accelerator.autocast():
            local_counts(accelerator.unwrap_model(model), batches, num_classes, device)

    run()  # cuDNN's algorithm search, the scaler's first steps and the first allocations stay outside the check
    if device.type != "cuda":
        run()
        return None
    torch.cuda.synchronize(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        run()
    except RuntimeError as exc:
        return str(exc).strip().splitlines()[0][:120]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return None


def _decode_rates(files: list[str], device, plan: Plan, load: float, logs: list[str]) -> list[float]:
    """Images/s of DALI's mixed decoder at this hw_decoder_load, in windows; appends DALI's log of the build to `logs`."""
    from nvidia.dali import fn, pipeline_def, types

    batch = min(len(files), 64)

    @pipeline_def
    def decode():
        jpegs, _ = fn.readers.file(files=files, name="Reader")
        return fn.decoders.image(jpegs, device="mixed", output_type=types.RGB, hw_decoder_load=load)

    with _stderr_captured() as log:
        # exec_dynamic=False: run() returns finished outputs, so a window's end is the decoder's.
        pipe = decode(batch_size=batch, num_threads=8, device_id=device.index, exec_dynamic=False)
        pipe.build()
        pipe.run()

    def one() -> int:
        pipe.run()
        return batch

    out = rate_windows(one, device, plan.window, plan.repeats)
    logs.append(log[0])
    return out


def _start_dmon() -> subprocess.Popen | None:
    """nvidia-smi's per-second utilisation monitor, or None where there is no nvidia-smi."""
    if not shutil.which("nvidia-smi"):
        return None
    return subprocess.Popen(
        ["nvidia-smi", "dmon", "-s", "u", "-d", "1"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )


def _jpg_util_max(text: str) -> int | None:
    """The highest NVJPG utilisation in dmon's output; None when it has no jpg column or no value."""
    header = next(
        (line.lstrip("#").split() for line in text.splitlines() if line.startswith("#") and "sm" in line), None
    )
    if not header or "jpg" not in header:
        return None
    col = header.index("jpg")
    values = [
        int(v[col])
        for v in (line.split() for line in text.splitlines() if not line.startswith("#"))
        if len(v) > col and v[col].isdigit()
    ]
    return max(values) if values else None


def hw_decoder(files: list[str], device, plan: Plan) -> dict:
    """Whether nvJPEG's hardware decoder ran: DALI's log, NVJPG utilisation from nvidia-smi, and its rate against the CUDA decoder."""
    logs: list[str] = []
    dmon = _start_dmon()
    hw = _decode_rates(files, device, plan, 1.0, logs)
    jpg = None
    if dmon is not None:
        dmon.terminate()
        jpg = _jpg_util_max(dmon.communicate(timeout=10)[0])
    cuda_only = _decode_rates(files, device, plan, 0.0, logs)
    warnings = [
        line.strip()
        for text in logs
        for line in text.splitlines()
        if "hw decoder" in line.lower() or "hardware" in line.lower()
    ]
    return {
        "hw_rates": hw,
        "cuda_rates": cuda_only,
        "jpg_util_max": jpg,
        "warnings": warnings,
        "capabilities": os.environ.get("NVIDIA_DRIVER_CAPABILITIES", "(unset)"),
    }


def loader_rates(cfg, split, device, plan: Plan) -> list[float]:
    """Loader-only images/s in back-to-back windows (see rate_windows), on the long training split."""
    from flowers_dist.data import Placement, build_loader
    from flowers_dist.steps import endless

    workers = max(1, len(os.sched_getaffinity(0)))
    loader = build_loader(
        cfg, split, train=True, batch_size=plan.batch, placement=Placement(0, 1, device, workers=workers), seed=0
    )
    batches = endless(loader)
    return rate_windows(lambda: next(batches)[0].shape[0], device, plan.window, plan.repeats)


def _train_tree(val, root: Path, images: int) -> Path:
    """A data root whose train/ repeats the val photos (symlinks) up to `images` files, and whose val/ is val.

    A long training split keeps DALI's end-of-epoch drain (one padded batch) out of the figures:
    on the 736 photos alone, batch 256 would decode 3 batches per epoch and yield 2.
    """
    (root / "val").symlink_to(Path(val.root).resolve())
    copies = -(-images // len(val))
    for f in val.files:
        out = root / "train" / f.parent.name
        out.mkdir(parents=True, exist_ok=True)
        for k in range(copies):
            (out / f"{k:04d}-{f.name}").symlink_to(f.resolve())
    return root


def end_to_end(data_root: Path, out: Path, batch: int, plan: Plan) -> dict:
    """The real training loop (`train()`: Accelerate, the DALI loader, logging as configured), bf16 and channels_last.

    (The dry run trains in fp32: bf16 on some CPUs is many times slower, and its speed means nothing there.)

    Windows are the loop's own log intervals (each ends with a device sync), after the first
    epoch (warm-up: cuDNN's search, first allocations); eval time is epoch_time - train_time.
    """
    from accelerate.state import AcceleratorState, GradientState

    from flowers_dist import config as config_module
    from flowers_dist import metrics_log
    from flowers_dist.train import train

    log_every = plan.e2e_log_every(batch)
    overrides = [
        *_recipe_overrides(data_root, plan),
        f"train.global_batch_size={batch}",
        f"train.eval_batch_size={max(batch, 64)}",
        f"train.epochs={plan.e2e_epochs}",
        f"train.log_every={log_every}",
        "train.progress=lines",
        f"train.output_dir={out}",
        f"train.name=e2e-{batch}",
        "tracking.wandb=disabled",
    ]
    cfg = config_module.load(REPO / "configs" / "flowers_resnet18.yaml", overrides)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    run_dir = train(cfg, "gpu_check")
    rows = metrics_log.read(metrics_log.path_of(run_dir))
    epochs = [r for r in rows if r.get("event") == "epoch"]
    per_epoch = epochs[0]["step"] // (epochs[0]["epoch"] + 1)  # an epoch row's step is (epoch + 1) x steps per epoch
    # Full windows only (an epoch's last, shorter one ends early), after the warm-up epoch.
    full = [
        r
        for r in rows
        if r.get("event") == "step" and r["epoch"] >= 1 and (r["step"] - r["epoch"] * per_epoch) % log_every == 0
    ]
    later = [r for r in epochs if r["epoch"] >= 1]
    return {
        "rates": [r["images_per_s"] for r in full],
        "window_s": [r["step_time"] * log_every for r in full],
        "eval_s": statistics.median(r["epoch_time"] - r["train_time"] for r in later),
        "log_every": log_every,
    }


def _recipe_overrides(data_root: Path, plan: Plan) -> list[str]:
    """The recipe as the end-to-end and start-up checks run it: DALI, channels_last, bf16 on the GPU (fp32 dry)."""
    return [
        f"data.root={data_root}",
        "data.loader=dali",
        f"data.image_size={plan.image_size}",
        "model.pretrained=none",
        "model.channels_last=true",
        # The train split repeats the val photos through links: the data check would rightly drop the
        # repeats as duplicates and leakage. These are known-good photos; its own cost is not under test here.
        "data.check=false",
        *(
            ["train.mixed_precision=no", "train.device=cpu", "data.num_workers=2"]
            if plan.dry
            else ["train.mixed_precision=bf16"]
        ),
    ]


def startup(data_root: Path, out: Path, plan: Plan) -> list[float]:
    from flowers_dist.bench.startup import first_step_seconds

    overrides = _recipe_overrides(data_root, plan)
    return [
        first_step_seconds(REPO / "configs" / "flowers_resnet18.yaml", overrides, out / f"startup-{i}")
        for i in range(2)
    ]


@dataclasses.dataclass
class Stages:
    """The check's stages and what they share: the plan, the device, the photos, the work folders and the table."""

    plan: Plan
    device: Any
    val: Any  # the val split: the photos every stage reads
    train_split: Any  # the long training split (_train_tree) over the same photos
    root: Path  # its data root, for the runs that train
    work: Path  # runs and gpu_check.json
    began: float
    estimate: dict[str, float]
    budget: float
    table: Table = dataclasses.field(default_factory=Table)
    e2e: dict = dataclasses.field(default_factory=dict)  # figures of the training runs, for the extrapolation

    @classmethod
    def make(
        cls, args: argparse.Namespace, plan: Plan, device, val, began: float, estimate: dict[str, float]
    ) -> Stages:
        """Make the work folder and the long training tree."""
        from flowers_dist.data import scan_split

        work = Path(tempfile.mkdtemp(prefix="gpu_check-")) if args.out is None else args.out
        work.mkdir(parents=True, exist_ok=True)
        biggest = max(plan.batch, RECIPE_BATCH)
        root = _train_tree(
            val,
            Path(tempfile.mkdtemp(prefix="gpu_check-data-")),
            int(plan.e2e_log_every(biggest) * biggest * 1.02) if not plan.dry else 8 * plan.batch,
        )
        return cls(plan, device, val, scan_split(root / "train"), root, work, began, estimate, args.budget)

    @property
    def files(self) -> list[str]:
        return [str(f) for f in self.val.files]

    def stage(self, name: str, fn) -> None:
        """Run one stage unless the time budget says otherwise; an exception fails that stage, not the run."""
        if not self.plan.dry and time.perf_counter() - self.began + self.estimate.get(name, 0) > self.budget:
            self.table.add(name, "not run: the time budget would be exceeded", status="skipped")
            return
        try:
            fn()
        except Exception as exc:  # one failing stage must not cost the others their device time
            self.table.add(
                name,
                f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:90] if str(exc).strip() else ''}",
                status="FAIL",
            )

    def run_all(self) -> None:
        """Every stage, in the order of the estimate."""
        self.stage("decode parity", self.decode)
        self.stage("eval parity", self.evaluation)
        self.stage("delayed read", self.delayed)
        self.stage("HW decoder", self.decoder)
        self.stage("sync-free steps", self.sync_free)
        self.stage("loader windows", self.loaders)
        self.stage("end-to-end runs", self.end_to_end_runs)
        self.stage("start-up runs", self.startup_runs)

    def decode(self) -> None:
        """nvJPEG against libjpeg-turbo, with and without fancy upsampling."""
        parity = decode_parity(self.files[:8] if self.plan.dry else self.files, self.device)
        self.table.check(
            "decode mixed (fancy) vs cpu",
            parity[True]["mean"] < DECODE_MEAN_TOL,
            f"mean {parity[True]['mean']:.3f} max {parity[True]['max']} grey",
            f"mean < {DECODE_MEAN_TOL}",
        )
        self.table.add(
            "decode mixed (default) vs cpu", f"mean {parity[False]['mean']:.3f} max {parity[False]['max']} grey"
        )

    def evaluation(self) -> None:
        """The evaluation loader on the device against the same on the CPU."""
        from flowers_dist.config import DataConfig

        val = self.val
        small = dataclasses.replace(val, files=val.files[:8], labels=val.labels[:8]) if self.plan.dry else val
        diff = eval_parity(DataConfig(loader="dali", image_size=self.plan.image_size), small, self.device)
        self.table.check(
            "eval loader gpu vs cpu", diff < EVAL_MEAN_TOL, f"mean {diff:.4f} (normalised)", f"< {EVAL_MEAN_TOL}"
        )

    def delayed(self) -> None:
        """A dropped batch read late keeps its pixels; on the GPU, also the zero-copy build that does not."""
        from flowers_dist.config import DataConfig

        plan = self.plan
        cfg = DataConfig(image_size=plan.image_size)
        got = delayed_read(cfg, self.val, self.device, plan.batch)
        covered = plan.dry or got["read_delay_s"] > got["host_advance_s"]
        self.table.check(
            "delayed read of a dropped batch",
            got["equal"] and covered,
            f"{'same sum' if got['equal'] else 'SUM CHANGED'}; read {got['read_delay_s']:.2f} s late, host advanced 8 batches in {got['host_advance_s']:.2f} s",
            "same sum, read after the advance",
        )
        if not plan.dry:
            zero = delayed_read(cfg, self.val, self.device, plan.batch, zero_copy=True)
            self.table.add(
                "  same with exec_dynamic views",
                "same sum" if zero["equal"] else "sum changed: views are unsafe",
                status="info: why OWN_THE_BATCH",
            )

    def decoder(self) -> None:
        """The hardware JPEG decoder in use, and its rate against the CUDA decoder."""
        if self.plan.dry:
            self.table.add("HW JPEG decoder", "needs CUDA", status="skipped")
            return
        got = hw_decoder(self.files, self.device, self.plan)
        used = got["jpg_util_max"] is not None and got["jpg_util_max"] > 0
        self.table.check(
            "HW JPEG decoder in use",
            used and not got["warnings"],
            f"NVJPG busy {got['jpg_util_max'] if got['jpg_util_max'] is not None else '?'}%; capabilities {got['capabilities']}"
            + (f"; {got['warnings'][0][:60]}" if got["warnings"] else ""),
            "NVJPG > 0%, no warning",
        )
        self.table.add("  decode, hw_decoder_load=1", _spread(got["hw_rates"]))
        self.table.add("  decode, CUDA decoder only", _spread(got["cuda_rates"]))

    def sync_free(self) -> None:
        """No host-device sync in the loop's step, per precision."""
        plan = self.plan
        for precision in ("bf16", "fp16") if not plan.dry else ("bf16",):
            found = sync_free_steps(
                precision,
                self.device,
                len(self.val.classes),
                batch=32 if not plan.dry else 4,
                size=64 if not plan.dry else 32,
            )
            self.table.check(
                f"no host sync per step, {precision}",
                found is None,
                "none" if found is None else found[:60],
                "none (Accelerator, fused SGD)" if not plan.dry else "dry run: steps only",
            )

    def loaders(self) -> None:
        """Loader-only rates on the recipe: DALI, PyTorch, and DALI without the hardware decoder."""
        from flowers_dist.config import DataConfig

        plan, size = self.plan, self.plan.image_size
        recipe = DataConfig(loader="dali", image_size=size, rotation=15, color_jitter=0.2)
        for name, cfg in (
            ("dali", recipe),
            ("torch", dataclasses.replace(recipe, loader="torch")),
            ("dali, hw_decoder_load=0", dataclasses.replace(recipe, hw_decoder_load=0.0)),
        ):
            if plan.dry and "hw" in name:
                continue
            rates = loader_rates(cfg, self.train_split, self.device, plan)
            self.table.add(
                f"loader {name} ({size} px, recipe)",
                _spread(rates),
                f">= {GOAL_IMAGES_PER_S:,} img/s",
                "ok" if statistics.median(rates) >= GOAL_IMAGES_PER_S else "below",
            )

    def end_to_end_runs(self) -> None:
        """The real training loop at the plan's batch and at the recipe's."""
        plan = self.plan
        for batch in (plan.batch, RECIPE_BATCH if not plan.dry else plan.batch // 2):
            self.e2e[batch] = end_to_end(self.root, self.work, batch, plan)
            got = self.e2e[batch]
            self.table.add(
                f"train loop bf16 cl, batch {batch}",
                _spread(got["rates"]) if got["rates"] else "no full window",
                f">= {GOAL_IMAGES_PER_S:,} img/s",
                "ok" if got["rates"] and statistics.median(got["rates"]) >= GOAL_IMAGES_PER_S else "below",
            )

    def startup_runs(self) -> None:
        """Time to the first step of fresh processes."""
        firsts = startup(self.root, self.work, self.plan)
        self.e2e["startup"] = statistics.median(firsts)
        self.table.add(
            "time to first step (fresh process)",
            f"{self.e2e['startup']:.1f} s (range {min(firsts):.1f}-{max(firsts):.1f})",
        )

    def recipe_row(self) -> None:
        """The 25-epoch recipe extrapolated from the start-up and the recipe batch's run, when both ran."""
        e2e = self.e2e
        recipe_batch = RECIPE_BATCH if not self.plan.dry else self.plan.batch // 2
        if not (e2e.get(recipe_batch, {}).get("rates") and "startup" in e2e):
            return
        rate = statistics.median(e2e[recipe_batch]["rates"])
        steps = RECIPE_TRAIN_IMAGES // RECIPE_BATCH
        seconds = e2e["startup"] + RECIPE_EPOCHS * (steps * RECIPE_BATCH / rate + e2e[recipe_batch]["eval_s"])
        self.table.add(
            "25-epoch recipe, extrapolated",
            f"{seconds:.1f} s = start-up {e2e['startup']:.1f} + 25 x ({steps} steps "
            f"at {rate:,.0f} img/s + eval {e2e[recipe_batch]['eval_s']:.2f} s)",
            f"<= {GOAL_RECIPE_S:.0f} s",
            "ok" if seconds <= GOAL_RECIPE_S else "over",
        )


def _announced_estimate(args: argparse.Namespace, num_val: int) -> dict[str, float]:
    """Seconds per stage, printed first."""
    # The estimate is always the GPU plan's (a dry run prints what the real run will promise).
    estimate = Plan.make(argparse.Namespace(**{**vars(args), "dry_run": False})).estimate(num_val)
    total = sum(estimate.values())
    print(
        f"gpu_check: estimated duration on an H200: {total:.0f} s ("
        + ", ".join(f"{k} {v:.0f}" for k, v in estimate.items())
        + f"); limit {GOAL_CHECK_S:.0f} s; {num_val} photos from {args.data / 'val'}",
        flush=True,
    )
    return estimate


def _finish(stages: Stages, total: float) -> int:
    """The duration row, the table, the failures and gpu_check.json; the exit code."""
    import torch

    plan, device, table = stages.plan, stages.device, stages.table
    took = time.perf_counter() - stages.began
    table.check(
        "gpu_check duration", took < GOAL_CHECK_S, f"{took:.0f} s (estimated {total:.0f} s)", f"< {GOAL_CHECK_S:.0f} s"
    )
    print(
        f"\ngpu_check{' --dry-run (CPU, tiny sizes: no figure means anything)' if plan.dry else ''}: "
        f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}; torch {torch.__version__}, "
        f"CUDA {torch.version.cuda}; {len(stages.val)} photos; batch {plan.batch}; windows >= {plan.window} s"
    )
    print(table.render())
    for row in table.failed:
        print(f"FAILED: {row.check}: {row.value}")
    (stages.work / "gpu_check.json").write_text(
        json.dumps([dataclasses.asdict(r) for r in table.rows], indent=1) + "\n"
    )
    return 1 if table.failed else 0


def run_main(args: argparse.Namespace) -> int:
    began = time.perf_counter()
    plan = Plan.make(args)
    import torch

    if not plan.dry and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible to torch", file=sys.stderr)
        return 1
    sys.path.insert(0, str(REPO))
    from flowers_dist.data import scan_split

    device = _device(plan)
    val = scan_split(args.data / "val")
    estimate = _announced_estimate(args, len(val))
    total = sum(estimate.values())
    if total >= GOAL_CHECK_S:
        print(
            f"gpu_check: the estimate is over the {GOAL_CHECK_S:.0f} s limit: lower --window or --repeats",
            file=sys.stderr,
        )
        return 2
    stages = Stages.make(args, plan, device, val, began, estimate)
    stages.run_all()
    stages.recipe_row()
    return _finish(stages, total)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", type=Path, default=REPO / ".gpu_carry", help="folder holding val/<class>/*.jpg (full-size photos)"
    )
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--window", type=float, default=5.0, help="seconds per timed window")
    parser.add_argument("--repeats", type=int, default=3, help="timed windows per loader figure")
    parser.add_argument(
        "--budget", type=float, default=540.0, help="skip a stage that would end after this many seconds"
    )
    parser.add_argument("--out", type=Path, help="folder for runs and gpu_check.json (default: a temporary folder)")
    parser.add_argument("--dry-run", action="store_true", help="CPU rehearsal at tiny sizes")
    return run_main(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
