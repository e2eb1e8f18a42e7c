"""`bench loader`: DALI against the PyTorch loader on a real folder, and the decode-only ceilings.

Where training's DALI CPU graph ends with the fused kernel (data/dali_fused.py), the same graph
with DALI's own rotate and colour operators runs too (`dali_with_dali_ops`), to show its share.

Both loaders are built through `build_loader`, as training builds them, with the same
augmentation, batch and number of threads/workers, and both deliver the contract's batches
(normalised, on the device). The ceilings decode whole JPEGs and nothing else: DALI's decoder
(nvJPEG on a GPU), and Pillow in a thread pool of the same size (Pillow releases the GIL while
decoding). Settings run in turns, `repeats` times, so that load from other processes falls on
all of them alike; each turn runs one warm-up epoch (pipeline build, worker start-up, page
cache) before the timed ones.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from ..config import Config, DataConfig
from ..data import Placement, build_loader
from ..data.folder import Split
from ..data.shards import read_sample
from ..data.usable import usable_splits
from ..steps import sync
from .common import spread


def loader_rates(
    cfg: DataConfig, split: Split, batch: int, placement: Placement, epochs: int, dali_fused: bool | None = None
) -> list[float]:
    """Images/s the loader yields in each of `epochs` epochs after one warm-up epoch.

    dali_fused=False builds the DALI loader with DALI's own rotate/colour operators on the CPU
    (see data/dali_fused.py), to show what the fused kernel gains; None builds what training builds.
    """
    if dali_fused is None:
        loader = build_loader(cfg, split, train=True, batch_size=batch, placement=placement, seed=0)
    else:
        from ..data.dali import build_dali_loader

        loader = build_dali_loader(cfg, split, True, batch, placement, seed=0, fused=dali_fused)
    next_epoch = itertools.count()

    def epoch() -> int:
        loader.set_epoch(next(next_epoch))
        images = sum(x.shape[0] for x, _ in loader)
        sync(placement.device)  # the last batch must have arrived before the clock is read
        return images

    rates = _epochs_of(epoch, epochs)
    return rates


def _epochs_of(run_epoch: Callable[[], int], epochs: int) -> list[float]:
    """Images/s of `epochs` calls of run_epoch (which returns its image count) after one warm-up call."""
    rates = []
    for epoch in range(epochs + 1):
        start = time.perf_counter()
        images = run_epoch()
        if epoch > 0:
            rates.append(images / (time.perf_counter() - start))
    return rates


def pil_decode_rates(split: Split, threads: int, epochs: int) -> list[float]:
    from PIL import Image

    def decode(i: int) -> None:
        # A pack's sample is read by offset from its shard (opened per read: threads must not share a file offset).
        source = io.BytesIO(read_sample(split.members[i])) if split.packed else split.files[i]
        with Image.open(source) as img:
            img.convert("RGB")

    with ThreadPoolExecutor(max(1, threads)) as pool:
        return _epochs_of(lambda: sum(1 for _ in pool.map(decode, range(len(split)))), epochs)


def dali_decode_rates(split: Split, batch: int, threads: int, device: torch.device, epochs: int) -> list[float]:
    from nvidia.dali import fn, pipeline_def, types

    from ..data.dali import encoded_in_order

    on_gpu = device.type == "cuda"

    @pipeline_def
    def decode_only():
        return fn.decoders.image(encoded_in_order(split), output_type=types.RGB, device="mixed" if on_gpu else "cpu")

    pipe = decode_only(batch_size=batch, num_threads=max(1, threads), device_id=(device.index or 0) if on_gpu else None)
    pipe.build()
    steps = len(split) // batch

    def epoch() -> int:
        for _ in range(steps):
            pipe.run()
        sync(device)
        return steps * batch

    rates = _epochs_of(epoch, epochs)
    return rates


def _fused_applies(data: DataConfig, device: torch.device) -> bool:
    from ..data import dali_status

    if not dali_status()[0]:
        return False
    from ..data.dali import use_fused_finish

    return use_fused_finish(data, device.type == "cuda")[0]


def bench_loader(cfg: Config, device: torch.device, workers: int, repeats: int, epochs: int) -> dict[str, Any]:
    """Images/s of every setting (median and spread over repeats x epochs) and the DALI / PyTorch ratio."""
    split, _, skipped = usable_splits(cfg.data)  # the files training reads: those the data check keeps
    print(skipped.line(), flush=True)
    batch = cfg.train.global_batch_size
    placement = Placement(rank=0, world_size=1, device=device, workers=workers)
    settings: dict[str, Callable[[], list[float]]] = {
        "dali": lambda: loader_rates(dataclasses.replace(cfg.data, loader="dali"), split, batch, placement, epochs),
        "torch": lambda: loader_rates(dataclasses.replace(cfg.data, loader="torch"), split, batch, placement, epochs),
        "dali_decode_only": lambda: dali_decode_rates(split, batch, workers, device, epochs),
        "pil_decode_only": lambda: pil_decode_rates(split, workers, epochs),
    }
    if _fused_applies(cfg.data, device):
        settings["dali_with_dali_ops"] = lambda: loader_rates(
            dataclasses.replace(cfg.data, loader="dali"), split, batch, placement, epochs, dali_fused=False
        )
    rates: dict[str, list[float]] = {name: [] for name in settings}
    for _ in range(repeats):
        for name, run in settings.items():
            rates[name] += run()
    rows = [{"setting": name, "images_per_s": spread(r)} for name, r in rates.items()]
    medians = {row["setting"]: row["images_per_s"]["median"] for row in rows}
    return {
        "images": len(split),
        "batch": batch,
        "workers": workers,
        "repeats": repeats,
        "epochs": epochs,
        "rows": rows,
        "ratio_dali_over_torch": medians["dali"] / medians["torch"],
        "dali_fraction_of_decode_ceiling": medians["dali"] / medians["dali_decode_only"],
        "torch_fraction_of_decode_ceiling": medians["torch"] / medians["pil_decode_only"],
        "fused_finish_speedup": (medians["dali"] / medians["dali_with_dali_ops"])
        if "dali_with_dali_ops" in medians
        else None,
    }
