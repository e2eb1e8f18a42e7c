"""`bench step`: the model step alone on synthetic device-resident batches, against a matmul peak.

The step is the training loop's own step (`steps.optimizer_step`) (forward, loss, backward, SGD update) on a
batch that already lives on the device, so no loader is involved. Model FLOPs are counted
by `torch.utils.flop_counter.FlopCounterMode` over one forward + backward (2 FLOPs per
multiply-add), not estimated; the peak is a square `torch.mm` in the same dtype, measured in
the same process just before, so both see the same clocks and the same other load.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from ..config import ModelConfig
from ..model import build_model
from ..steps import one_batch_step, sync
from .common import spread

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def precisions_available(device: torch.device) -> list[str]:
    """fp16 only on CUDA (on the CPU it has no fast kernels and Accelerate refuses it); bf16 where supported."""
    if device.type != "cuda":
        return ["fp32", "bf16"]
    return ["fp32", "bf16", "fp16"] if torch.cuda.is_bf16_supported() else ["fp32", "fp16"]


def autocast(device: torch.device, precision: str):
    """The one place this module chooses precision: autocast for bf16/fp16, nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


def count_flops(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, backward: bool = True) -> int:
    """FLOPs of one forward (+ backward) pass, counted by PyTorch's dispatcher-level counter."""
    with FlopCounterMode(display=False) as counter:
        loss = F.cross_entropy(model(images).float(), labels)
        if backward:
            loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def matmul_peak(device: torch.device, precision: str, size: int, reps: int) -> dict[str, Any]:
    """FLOP/s of a size x size matmul in the step's dtype: one warm-up, then `reps` timed products."""
    a = torch.randn(size, size, device=device, dtype=DTYPES[precision])
    b = torch.randn(size, size, device=device, dtype=DTYPES[precision])
    torch.mm(a, b)
    rates = []
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        rates.append(2 * size**3 / (time.perf_counter() - start))
    return {"size": size, "flops_per_s": spread(rates)}


def step_rates(
    model, optimizer, images, labels, device, precision: str, warmup: int, steps: int, repeats: int
) -> list[float]:
    """Images/s of `repeats` runs of `steps` steps each, after `warmup` untimed steps."""
    with autocast(device, precision):
        for _ in range(warmup):
            one_batch_step(model, optimizer, images, labels)
        rates = []
        for _ in range(repeats):
            sync(device)
            start = time.perf_counter()
            for _ in range(steps):
                one_batch_step(model, optimizer, images, labels)
            sync(device)
            rates.append(steps * images.shape[0] / (time.perf_counter() - start))
    return rates


def _check_precisions(precisions: list[str], device: torch.device) -> None:
    """Refuse a precision this device cannot run, before anything is measured."""
    unsupported = [p for p in precisions if p not in precisions_available(device)]
    if unsupported:
        raise ValueError(
            f"precision {unsupported[0]} is not available on {device.type} (available: {precisions_available(device)})"
        )


def _synthetic_batch(
    batch: int, image_size: int, num_classes: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """One fixed-seed batch of random images and labels, already on the device."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, image_size, image_size, generator=generator).to(device)
    labels = torch.randint(0, num_classes, (batch,), generator=generator).to(device)
    return images, labels


def _format_row(
    model_cfg: ModelConfig,
    num_classes: int,
    images: torch.Tensor,
    labels: torch.Tensor,
    device: torch.device,
    *,
    precision: str,
    memory_format: str,
    compile_model: bool,
    warmup: int,
    steps: int,
    repeats: int,
    lr: float,
) -> dict[str, Any]:
    """A fresh model in one precision and memory format: its counted FLOPs and timed steps (no peak fraction yet)."""
    channels_last = memory_format == "channels_last"
    model = build_model(
        ModelConfig(name=model_cfg.name, pretrained="none", channels_last=channels_last), num_classes
    ).to(device)
    x = images.contiguous(memory_format=torch.channels_last) if channels_last else images
    with autocast(device, precision):
        flops = count_flops(model, x, labels)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    stepped = torch.compile(model) if compile_model else model
    rates = step_rates(stepped, optimizer, x, labels, device, precision, warmup, steps, repeats)
    batch = images.shape[0]
    return {
        "precision": precision,
        "memory_format": memory_format,
        "compiled": compile_model,
        "images_per_s": spread(rates),
        "flops_per_image": flops / batch,
        "achieved_flops_per_s": spread(rates)["median"] * flops / batch,
    }


def _settle_peak(
    peak: dict[str, Any], rows: list[dict[str, Any]], device: torch.device, precision: str, size: int, reps: int
) -> None:
    """Measure the peak again and set each of this precision's rows' fraction of the best product."""
    # Measured again after the steps: the peak is the best product seen, so a burst of load from
    # other processes during one measurement does not flatter the step.
    after = matmul_peak(device, precision, size, reps)["flops_per_s"]["values"]
    peak["flops_per_s"] = spread(peak["flops_per_s"]["values"] + after)
    for row in rows:
        if row["precision"] == precision:
            row["fraction_of_matmul_peak"] = row["achieved_flops_per_s"] / peak["flops_per_s"]["max"]


def bench_step(
    model_cfg: ModelConfig,
    num_classes: int,
    image_size: int,
    batch: int,
    device: torch.device,
    *,
    precisions: list[str],
    formats: list[str],
    compile_model: bool,
    warmup: int,
    steps: int,
    repeats: int,
    matmul_size: int,
    lr: float = 1e-3,
) -> dict[str, Any]:
    """One row per (precision, memory format): images/s, achieved FLOP/s and its fraction of the matmul peak (the best product)."""
    _check_precisions(precisions, device)
    images, labels = _synthetic_batch(batch, image_size, num_classes, device)
    rows, peaks = [], {}
    reps = max(5, repeats)
    for precision in precisions:
        peaks[precision] = matmul_peak(device, precision, matmul_size, reps)
        for memory_format in formats:
            rows.append(
                _format_row(
                    model_cfg,
                    num_classes,
                    images,
                    labels,
                    device,
                    precision=precision,
                    memory_format=memory_format,
                    compile_model=compile_model,
                    warmup=warmup,
                    steps=steps,
                    repeats=repeats,
                    lr=lr,
                )
            )
        _settle_peak(peaks[precision], rows, device, precision, matmul_size, reps)
    return {
        "image_size": image_size,
        "batch": batch,
        "warmup": warmup,
        "steps": steps,
        "repeats": repeats,
        "matmul_peak": peaks,
        "rows": rows,
    }
