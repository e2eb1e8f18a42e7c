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

The data's temperature (`--temperature`): warm reads from the page cache, as after the warm-up
epoch; cold evicts every file the settings read (a folder's images; a pack's shards, indexes,
listing and manifest) before each timed epoch and checks with mincore that they left the cache
(bench/pagecache.py). A cold figure whose files stayed resident is marked as not cold.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from ..config import Config, DataConfig
from ..data import Placement, build_loader, shards
from ..data.folder import Split
from ..data.shards import read_sample
from ..data.usable import usable_splits
from ..steps import sync
from . import pagecache
from .common import spread, table

TEMPERATURES = {"warm": ("warm",), "cold": ("cold",), "both": ("warm", "cold")}
RESIDENCY_METHOD = "mmap + mincore(2) through ctypes (as util-linux fincore)"
BeforeEpoch = Callable[[], None] | None
"""Called before each timed epoch (cold: evict the files); None for warm."""


def loader_rates(
    cfg: DataConfig,
    split: Split,
    batch: int,
    placement: Placement,
    epochs: int,
    dali_fused: bool | None = None,
    before_epoch: BeforeEpoch = None,
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

    return _epochs_of(epoch, epochs, before_epoch)


def _epochs_of(run_epoch: Callable[[], int], epochs: int, before_epoch: BeforeEpoch = None) -> list[float]:
    """Images/s of `epochs` calls of run_epoch (which returns its image count) after one warm-up call."""
    rates = []
    for epoch in range(epochs + 1):
        if epoch > 0 and before_epoch is not None:
            before_epoch()  # outside the clock
        start = time.perf_counter()
        images = run_epoch()
        if epoch > 0:
            rates.append(images / (time.perf_counter() - start))
    return rates


def pil_decode_rates(split: Split, threads: int, epochs: int, before_epoch: BeforeEpoch = None) -> list[float]:
    from PIL import Image

    def decode(i: int) -> None:
        # A pack's sample is read by offset from its shard (opened per read: threads must not share a file offset).
        source = io.BytesIO(read_sample(split.members[i])) if split.packed else split.files[i]
        with Image.open(source) as img:
            img.convert("RGB")

    with ThreadPoolExecutor(max(1, threads)) as pool:
        return _epochs_of(lambda: sum(1 for _ in pool.map(decode, range(len(split)))), epochs, before_epoch)


def dali_decode_rates(
    split: Split, batch: int, threads: int, device: torch.device, epochs: int, before_epoch: BeforeEpoch = None
) -> list[float]:
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

    return _epochs_of(epoch, epochs, before_epoch)


def _fused_applies(data: DataConfig, device: torch.device) -> bool:
    from ..data import dali_status

    if not dali_status()[0]:
        return False
    from ..data.dali import use_fused_finish

    return use_fused_finish(data, device.type == "cuda")[0]


def files_read(root: str | Path, split: Split) -> list[Path]:
    """Every file the settings read for the train split: its images, or a pack's shards, indexes, listing and manifest."""
    if not split.packed:
        return list(split.files)
    part = shards.load(root).splits["train"]
    return [
        *(s.tar for s in part.shards),
        *(s.index for s in part.shards),
        part.listing,
        Path(root) / shards.MANIFEST,
    ]


class Cold:
    """Evicts the files before each timed epoch and keeps what mincore measured right after."""

    def __init__(self, files: list[Path]) -> None:
        self.files = files
        self.checks: list[dict] = []

    def __call__(self) -> None:
        self.checks.append(pagecache.evict_and_check(self.files))

    def take(self) -> list[dict]:
        checks, self.checks = self.checks, []
        return checks


def _settings(
    cfg: Config, split: Split, device: torch.device, workers: int, epochs: int
) -> dict[str, Callable[[BeforeEpoch], list[float]]]:
    """Each setting as a function of the hook called before its timed epochs."""
    batch = cfg.train.global_batch_size
    placement = Placement(rank=0, world_size=1, device=device, workers=workers)
    dali, torch_ = dataclasses.replace(cfg.data, loader="dali"), dataclasses.replace(cfg.data, loader="torch")
    settings: dict[str, Callable[[BeforeEpoch], list[float]]] = {
        "dali": lambda b: loader_rates(dali, split, batch, placement, epochs, before_epoch=b),
        "torch": lambda b: loader_rates(torch_, split, batch, placement, epochs, before_epoch=b),
        "dali_decode_only": lambda b: dali_decode_rates(split, batch, workers, device, epochs, b),
        "pil_decode_only": lambda b: pil_decode_rates(split, workers, epochs, b),
    }
    if _fused_applies(cfg.data, device):
        settings["dali_with_dali_ops"] = lambda b: loader_rates(
            dali, split, batch, placement, epochs, dali_fused=False, before_epoch=b
        )
    return settings


def cold_check(rows: list[dict]) -> dict[str, Any]:
    """Whether every cold epoch started with its files out of the page cache, as measured."""
    checks = [c for r in rows if r["temperature"] == "cold" for c in r["residency"]]
    fractions = [c["resident_fraction"] for c in checks]
    verified = bool(checks) and all(c["cold"] for c in checks)
    largest = max((f for f in fractions if f is not None), default=None)
    if not checks:
        line = "cold: no timed epoch ran, nothing was evicted"
    elif verified:
        line = f"cold: every timed epoch started with at most {largest:.1%} of its files' pages in the page cache"
    elif any(c.get("mapped_files") and not c["cold"] for c in checks):
        line = (
            "cold NOT verified: a reader holds the files mapped (mmap), so their pages cannot be evicted; "
            "the cold figures may be warm"
        )
    elif any(c["unmeasured_files"] for c in checks):
        line = (
            "cold NOT verified: mincore cannot report on files this user neither owns nor may write "
            "(a read-only mount?); the cold figures may be warm"
        )
    else:
        line = (
            f"cold NOT verified: after posix_fadvise(DONTNEED) up to {largest:.1%} of the pages stayed cached "
            "(the file system keeps them, or a loader re-read them at once); the cold figures may be warm"
        )
    return {"method": RESIDENCY_METHOD, "verified": verified, "max_resident_fraction": largest, "line": line}


def measure(
    cfg: Config,
    split: Split,
    device: torch.device,
    workers: int,
    repeats: int,
    epochs: int,
    temperatures: tuple[str, ...],
    files: list[Path],
    names: tuple[str, ...] | None = None,
) -> list[dict[str, Any]]:
    """One row per temperature and setting (all settings, or `names`): images/s, and for cold the residency checks.

    Settings and temperatures run in turns, `repeats` times; a cold turn evicts `files` before each timed epoch.
    """
    settings = _settings(cfg, split, device, workers, epochs)
    if names is not None:
        settings = {name: settings[name] for name in names}
    cold = Cold(files)
    rates: dict[tuple[str, str], list[float]] = {(t, name): [] for t in temperatures for name in settings}
    checks: dict[str, list[dict]] = {name: [] for name in settings}
    for _ in range(repeats):
        for t in temperatures:
            for name, run in settings.items():
                rates[t, name] += run(cold if t == "cold" else None)
                checks[name] += cold.take()
    return [
        {
            "setting": name,
            "temperature": t,
            "images_per_s": spread(r),
            **({"residency": checks[name]} if t == "cold" else {}),
        }
        for (t, name), r in rates.items()
    ]


def bench_loader(
    cfg: Config, device: torch.device, workers: int, repeats: int, epochs: int, temperature: str = "warm"
) -> dict[str, Any]:
    """Images/s of every setting at each temperature (median and spread over repeats x epochs) and the ratios."""
    split, _, skipped = usable_splits(cfg.data)  # the files training reads: those the data check keeps
    print(skipped.line(), flush=True)
    temperatures = TEMPERATURES[temperature]
    files = files_read(cfg.data.root, split) if "cold" in temperatures else []
    rows = measure(cfg, split, device, workers, repeats, epochs, temperatures, files)
    first = temperatures[0]
    medians = {row["setting"]: row["images_per_s"]["median"] for row in rows if row["temperature"] == first}
    results = {
        "images": len(split),
        "batch": cfg.train.global_batch_size,
        "workers": workers,
        "repeats": repeats,
        "epochs": epochs,
        "packed": split.packed,
        "temperatures": list(temperatures),
        "rows": rows,
        "ratio_dali_over_torch": medians["dali"] / medians["torch"],
        "dali_fraction_of_decode_ceiling": medians["dali"] / medians["dali_decode_only"],
        "torch_fraction_of_decode_ceiling": medians["torch"] / medians["pil_decode_only"],
        "fused_finish_speedup": (medians["dali"] / medians["dali_with_dali_ops"])
        if "dali_with_dali_ops" in medians
        else None,
    }
    if "cold" in temperatures:
        results["files_evicted"] = len(files)
        results["cold_check"] = cold_check(rows)
        print(results["cold_check"]["line"], flush=True)
    if len(temperatures) == 2:
        warm = {r["setting"]: r["images_per_s"]["median"] for r in rows if r["temperature"] == "warm"}
        results["cold_over_warm"] = {
            r["setting"]: r["images_per_s"]["median"] / warm[r["setting"]] for r in rows if r["temperature"] == "cold"
        }
    return results


def report(results: dict[str, Any]) -> str:
    """Images/s per setting, the temperatures side by side with cold / warm, and the DALI / PyTorch ratio."""
    temps = results["temperatures"]
    by_setting: dict[str, dict[str, Any]] = {}
    for r in results["rows"]:
        row = by_setting.setdefault(r["setting"], {"setting": r["setting"]})
        t, ips = r["temperature"], r["images_per_s"]
        row[t] = ips["median"]
        row[f"{t}_range"] = f"{ips['min']:.0f}-{ips['max']:.0f}"
        if "residency" in r:
            fractions = [c["resident_fraction"] for c in r["residency"] if c["resident_fraction"] is not None]
            row["resident"] = 100 * max(fractions) if fractions else None
    columns = [("setting", "setting", "s")]
    for t in temps:
        columns += [(t, f"{t} img/s", ".0f"), (f"{t}_range", "range", "s")]
    if "cold" in temps:
        columns.append(("resident", "resident % before cold", ".1f"))
    if "cold_over_warm" in results:
        for name, ratio in results["cold_over_warm"].items():
            by_setting[name]["ratio"] = ratio
        columns.append(("ratio", "cold/warm", ".2f"))
    text = table(list(by_setting.values()), columns)
    text += f"\nDALI / PyTorch ({temps[0]}) = {results['ratio_dali_over_torch']:.2f}x"
    if results.get("fused_finish_speedup"):
        text += f"; DALI with the fused CPU finish / with DALI's rotate and colour operators = {results['fused_finish_speedup']:.2f}x"
    if "cold_check" in results:
        text += f"\n{results['cold_check']['line']} ({results['cold_check']['method']})"
    return text
