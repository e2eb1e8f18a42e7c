"""What `bench` advises after a measurement: the one setting most likely to move the bottleneck, from what the hardware does.

bf16 on a CPU is advised only where both hold: the CPU has bf16 instructions (`amx_bf16` on Xeons
with AMX, `avx512_bf16`), and a bf16 step measured faster than an fp32 one. Either alone misleads:
without the instructions bf16 is emulated and much slower (an AVX2-only CPU), and with them the
gain still depends on the model and the batch (1.64x measured for `bench train` at 128 px on a Xeon
with AMX).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..config import Config

BF16_FLAGS = ("amx_bf16", "avx512_bf16")
"""/proc/cpuinfo flags of CPU instructions that compute in bf16."""
MIN_SPEEDUP = 1.05
"""A measured ratio closer to 1 than this is noise, not a reason to change precision."""


def cpu_bf16_flags(cpuinfo: str | None = None) -> tuple[str, ...]:
    """The BF16_FLAGS this CPU has, from /proc/cpuinfo (or the given text of one); () where it cannot be read."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:  # not Linux: say nothing rather than guess
            return ()
    flags = next(
        (line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.split(":")[0].strip() == "flags"), []
    )
    return tuple(f for f in BF16_FLAGS if f in flags)


def measure_bf16_speedup(
    step: Callable[[], object], device_type: str = "cpu", warmup: int = 1, repeats: int = 3
) -> float:
    """How many times faster `step()` runs under bf16 autocast than in fp32 (> 1: bf16 is faster), by median times.

    `step` is one training step (forward, backward, update) on a fixed batch. The two precisions
    alternate, so a machine that slows down during the measurement slows both alike.
    """

    def seconds(bf16: bool) -> float:
        if device_type == "cuda":
            torch.cuda.synchronize()  # queued work is not this step's
        start = time.perf_counter()
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
            step()
        if device_type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for _ in range(warmup):
        seconds(False), seconds(True)
    fp32, bf16 = zip(*((seconds(False), seconds(True)) for _ in range(repeats)))
    return statistics.median(fp32) / statistics.median(bf16)


def _cpu_precision(cfg: Config, bf16_speedup: float | None, cpu_flags: tuple[str, ...] | None) -> str | None:
    """bf16 where the CPU has the instructions and it measured faster; back to fp32 where bf16 measured slower."""
    if bf16_speedup is None:
        return None
    if cfg.train.mixed_precision == "no" and bf16_speedup >= MIN_SPEEDUP:
        flags = cpu_bf16_flags() if cpu_flags is None else cpu_flags
        if flags:
            return (
                f"train.mixed_precision=bf16 (a bf16 step measured {bf16_speedup:.2f}x as fast as fp32 here; "
                f"the CPU has {', '.join(flags)})"
            )
    if cfg.train.mixed_precision == "bf16" and bf16_speedup * MIN_SPEEDUP <= 1:
        return f"train.mixed_precision=no (a bf16 step measured {1 / bf16_speedup:.2f}x as slow as fp32 here)"
    return None


def advice(
    cfg: Config,
    device: torch.device,
    bottleneck: str,
    *,
    bf16_speedup: float | None = None,
    cpu_flags: tuple[str, ...] | None = None,
) -> str:
    """The one setting most likely to move the bottleneck.

    `bf16_speedup`: fp32 step time over bf16 step time as measured on this machine (measure_bf16_speedup),
    None where not measured; on a CPU, bf16 is advised only from it. `cpu_flags`: the CPU's bf16
    flags, read from /proc/cpuinfo when None.
    """
    if bottleneck == "data wait":
        if cfg.data.loader == "torch":
            return "data.loader=dali, or more decode workers (data.num_workers)"
        if device.type == "cuda":
            return "more DALI threads (data.num_workers), or hw_decoder_load toward the hardware JPEG decoder"
        return "more DALI threads (data.num_workers); on a GPU host DALI decodes with nvJPEG (mixed)"
    if bottleneck == "communication":
        return "a larger per-process batch (train.global_batch_size), so each all-reduce carries more images"
    measured = _cpu_precision(cfg, bf16_speedup, cpu_flags) if device.type == "cpu" else None
    if measured:  # a measurement on this machine outranks the general advice below
        return measured
    if not cfg.model.channels_last:
        return "model.channels_last=true"
    if device.type == "cuda" and cfg.train.mixed_precision == "no":
        return "train.mixed_precision=bf16"
    if not cfg.model.compile:
        return "model.compile=true (`bench step --compile` measures it), or a larger batch"
    return "a larger batch (train.global_batch_size)"
