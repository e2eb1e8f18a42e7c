"""One-GPU check of the DALI path: nvJPEG against CPU decoding, sync-free steps, a few bf16 training steps, images/s.

Run by launch/gpu_check.sh (which installs DALI first), from the project root:

    python launch/gpu_check.py [--data data/flowers_sample] [--steps 30] [--batch 128]

Exits 1 when a check fails; prints a short table at the end either way.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from flowers_dist.config import DataConfig, ModelConfig  # noqa: E402
from flowers_dist.data import Placement, build_loader, scan_split  # noqa: E402
from flowers_dist.model import build_model  # noqa: E402
from flowers_dist.train import step_counts, sync, train_step  # noqa: E402

# nvJPEG with fancy upsampling against libjpeg-turbo: DALI's own decoder test allows a mean
# absolute difference below 1 grey level (IDCT implementations differ by rounding). Without
# fancy upsampling (the training default, faster, and what ROI decoding uses) the chroma
# differs more; that figure is reported, not checked.
DECODE_MEAN_TOL = 1.0
# The whole evaluation pipeline, GPU against CPU, in normalised units (1 grey level ~ 0.017).
EVAL_MEAN_TOL = 0.02


def decode_parity(files: list[str]) -> dict:
    """Per-image mean and max |mixed - cpu| over the files, with and without fancy upsampling."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def
    def both(fancy: bool):
        jpegs, _ = fn.readers.file(files=files, random_shuffle=False, name="Reader")
        gpu = fn.decoders.image(jpegs, device="mixed", output_type=types.RGB, jpeg_fancy_upsampling=fancy)
        cpu = fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)
        return gpu, cpu

    out = {}
    for fancy in (True, False):
        pipe = both(fancy=fancy, batch_size=len(files), num_threads=4, device_id=torch.cuda.current_device())
        pipe.build()
        gpu, cpu = pipe.run()
        gpu = gpu.as_cpu()
        diffs = [np.abs(np.array(g, dtype=np.int16) - np.array(c, dtype=np.int16)) for g, c in zip(gpu, cpu)]
        assert all(d.shape == np.array(c).shape for d, c in zip(diffs, cpu)), "decoded shapes differ"
        out[fancy] = dict(mean=max(float(d.mean()) for d in diffs), max=max(int(d.max()) for d in diffs))
        del pipe
    return out


def eval_parity(cfg: DataConfig, split) -> float:
    """Largest per-image mean |GPU - CPU| of the production evaluation loader, normalised units."""
    def images(device: torch.device) -> torch.Tensor:
        loader = build_loader(cfg, split, train=False, batch_per_rank=16,
                              placement=Placement(0, 1, device, workers=4), seed=0)
        return torch.cat([x.float().cpu() for x, _ in loader])

    gpu, cpu = images(torch.device("cuda", torch.cuda.current_device())), images(torch.device("cpu"))
    return float((gpu - cpu).abs().mean(dim=(1, 2, 3)).max())


def loader_rate(cfg: DataConfig, split, batch: int, workers: int, device: torch.device, batches: int) -> float:
    """Loader-only images/s over `batches` batches, after one warm-up epoch."""
    loader = build_loader(cfg, split, train=True, batch_per_rank=batch, placement=Placement(0, 1, device, workers=workers), seed=0)
    for _ in loader:  # warm-up: build, first allocations, page cache
        pass
    done, epoch = 0, 1
    sync(device)
    start = time.perf_counter()
    while done < batches:
        loader.set_epoch(epoch)
        for _ in loader:
            done += 1
            if done == batches:
                break  # the loader finishes DALI's epoch itself at the next __iter__
        epoch += 1
    sync(device)
    return batches * batch / (time.perf_counter() - start)


def bf16_model(num_classes: int, device: torch.device) -> torch.nn.Module:
    """A channels_last ResNet-18 whose forward runs under bf16 autocast, as Accelerate's mixed precision wraps it."""
    model = build_model(ModelConfig(pretrained="none", channels_last=True), num_classes).to(device)
    model.forward = torch.autocast(device.type, dtype=torch.bfloat16)(model.forward)
    return model


def train_rate(cfg: DataConfig, split, batch: int, workers: int, device: torch.device, steps: int) -> tuple[float, float]:
    """End-to-end bf16 training images/s (DALI feeding a channels_last ResNet-18), and the last loss."""
    model = bf16_model(len(split.classes), device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    placement = Placement(0, 1, device, channels_last=True, workers=workers)
    loader = build_loader(cfg, split, train=True, batch_per_rank=batch, placement=placement, seed=0)
    warmup, done, epoch, start, loss = 5, 0, 0, None, torch.zeros(())
    while done < warmup + steps:
        loader.set_epoch(epoch)
        for images, labels in loader:
            _, loss = train_step(model, optimizer, images, labels)
            done += 1
            if done == warmup:
                sync(device)  # cuDNN autotuning and the first allocations stay out of the timing
                start = time.perf_counter()
            if done == warmup + steps:
                break
        epoch += 1
    sync(device)
    return steps * batch / (time.perf_counter() - start), loss.item()


def sync_free_steps(device: torch.device, num_classes: int, batch: int, size: int = 64) -> str | None:
    """The loop's train step, its per-step counts and evaluation's counts under torch's sync-debug mode.

    A host-device sync per step (a .item(), a copy from the host, CUDA's bincount) stops the
    host from queueing work ahead of the GPU. Returns the first sync's message, or None.
    """
    from flowers_dist.evaluate import local_counts

    model = bf16_model(num_classes, device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    batches = [(torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last),
                torch.randint(0, num_classes, (batch,), device=device)) for _ in range(3)]
    sums = torch.zeros(3, dtype=torch.float64, device=device)

    def run() -> None:
        model.train()
        for images, labels in batches:
            logits, loss = train_step(model, optimizer, images, labels)
            sums.add_(step_counts(loss, logits, labels))
        local_counts(model, batches, num_classes, device)

    run()  # cuDNN's algorithm search and the first allocations happen once, outside the check
    torch.cuda.synchronize(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        run()
    except RuntimeError as exc:
        return str(exc).strip().splitlines()[0][:120]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO / "data" / "flowers_sample")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30, help="timed training steps (after 5 warm-up steps)")
    parser.add_argument("--repeat", type=int, default=0,
                        help="list the train files this many times so that a small sample fills big batches (0 = auto)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible to torch", file=sys.stderr)
        return 1
    import nvidia.dali

    device = torch.device("cuda", torch.cuda.current_device())
    workers = max(1, len(os.sched_getaffinity(0)))
    train, val = scan_split(args.data / "train"), scan_split(args.data / "val")
    repeat = args.repeat or max(1, -(-8 * args.batch // len(train)))  # at least 8 batches per epoch
    train = type(train)(train.root, train.classes, train.files * repeat, train.labels * repeat)
    recipe = DataConfig(loader="dali", image_size=224, rotation=15, color_jitter=0.2)
    results, failures = [], []

    files = [str(f) for f in val.files]
    parity = decode_parity(files)
    ok = parity[True]["mean"] < DECODE_MEAN_TOL
    failures += [] if ok else [f"nvJPEG (fancy) vs CPU mean diff {parity[True]['mean']:.2f} >= {DECODE_MEAN_TOL}"]
    results.append(("decode mixed (fancy) vs cpu", f"mean {parity[True]['mean']:.3f} max {parity[True]['max']} grey", "ok" if ok else "FAIL"))
    results.append(("decode mixed (default) vs cpu", f"mean {parity[False]['mean']:.3f} max {parity[False]['max']} grey", "info"))

    eval_diff = eval_parity(DataConfig(loader="dali", image_size=224), val)
    ok = eval_diff < EVAL_MEAN_TOL
    failures += [] if ok else [f"eval loader GPU vs CPU mean diff {eval_diff:.4f} >= {EVAL_MEAN_TOL}"]
    results.append(("eval loader gpu vs cpu", f"mean {eval_diff:.4f} (normalised)", "ok" if ok else "FAIL"))

    for kind in ("dali", "torch"):
        cfg = DataConfig(loader=kind, image_size=224, rotation=15, color_jitter=0.2)
        rate = loader_rate(cfg, train, args.batch, workers, device, batches=20)
        results.append((f"loader {kind}, recipe 224 px", f"{rate:,.0f} img/s", f"{workers} threads/workers"))
    # What the hardware JPEG decoder adds: the same loader with every JPEG on nvJPEG's CUDA decoder.
    rate = loader_rate(dataclasses.replace(recipe, hw_decoder_load=0.0), train, args.batch, workers, device, batches=20)
    results.append(("loader dali, hw_decoder_load=0", f"{rate:,.0f} img/s", "info: CUDA decoder only"))

    sync = sync_free_steps(device, len(train.classes), batch=32)
    failures += [] if sync is None else [f"a host-device sync in the train/eval step: {sync}"]
    results.append(("no host sync in train/eval steps", "ok" if sync is None else sync[:28], "ok" if sync is None else "FAIL"))

    rate, loss = train_rate(recipe, train, args.batch, workers, device, args.steps)
    ok = bool(np.isfinite(loss))
    failures += [] if ok else [f"training loss is {loss}"]
    results.append(("train bf16 resnet18 + dali", f"{rate:,.0f} img/s", f"loss {loss:.3f}" if ok else "FAIL"))

    print(f"\n{torch.cuda.get_device_name(device)}; torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"DALI {nvidia.dali.__version__}; {len(train)} train files ({repeat}x {args.data}), batch {args.batch}")
    width = max(len(r[0]) for r in results)
    for name, value, note in results:
        print(f"  {name:<{width}}  {value:<28} {note}")
    for failure in failures:
        print(f"FAILED: {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
