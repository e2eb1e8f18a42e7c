"""Folder against shards on many small files, warm and cold: what listing and opening files cost.

Makes N small JPEGs (random crops of the real photos, re-encoded at 64-96 px: many files, few
bytes) as a folder of class folders in a temporary folder, packs the same set with `data pack`,
then times, on each layout: the listing (a scan of the class folders; a pack's manifest, indexes
and listing, read cold) and `bench loader`'s DALI and PyTorch loaders on the train split, warm
(page cache) and cold (every file evicted with posix_fadvise before each timed epoch, checked
with mincore). Prints a markdown table and writes benchmarks/results/many_files-<host>.json.

    python benchmarks/many_files.py [--n 20000] [--source ../shared/flowers] [--keep DIR] [--slow-open-ms 3]

--slow-open-ms MS also serves both layouts through a read-only FUSE passthrough that sleeps MS
in every open, as a network file system's round trip does, and measures them there too (cold
evicts the files on the mount and beneath it). It needs `fusepy` (pip) and FUSE (`apt-get
install -y fuse3 libfuse2`; /dev/fuse), and runs as root or with user mounts allowed.

The folder's directory entries stay in the kernel's dentry cache (only root's drop_caches
evicts them), so its listing is timed warm: on a network file system it costs more.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from flowers_dist import config as config_module  # noqa: E402
from flowers_dist.bench import pagecache  # noqa: E402
from flowers_dist.bench.loader import cold_check, files_read, measure  # noqa: E402
from flowers_dist.bench.tta import cpu_info  # noqa: E402
from flowers_dist.data import Placement, build_loader, default_workers, shards  # noqa: E402
from flowers_dist.data.folder import scan_dataset  # noqa: E402
from flowers_dist.data.pack import pack  # noqa: E402
from flowers_dist.data.usable import usable_splits  # noqa: E402

LAYOUTS = ("folder", "shards")
SETTINGS = ("dali", "torch")


def default_source() -> Path:
    shared = REPO.parent / "shared" / "flowers"
    return shared if shared.is_dir() else REPO / "data" / "flowers_sample"


def make_set(source: Path, out: Path, n: int, sizes: tuple[int, int], seed: int) -> None:
    """N train images (and N/20 val, at least 2 per class) cropped from the source's train photos, classes kept."""
    from PIL import Image

    train, _ = scan_dataset(source)
    rng = random.Random(seed)
    order = list(range(len(train)))
    rng.shuffle(order)
    per_class = len(train.classes)
    counts = {"train": n, "val": max(2 * per_class, n // 20)}
    made = 0
    for split, count in counts.items():
        for i in range(count):
            k = order[made % len(order)]
            made += 1
            with Image.open(train.files[k]) as img:
                img.draft("RGB", (256, 256))  # a JPEG decoded at 1/2..1/8 scale: quick, and enough for 96 px
                img = img.convert("RGB")
            side = rng.randint(*sizes)
            w, h = img.size
            crop = rng.randint(min(w, h) // 2, min(w, h))
            x, y = rng.randint(0, w - crop), rng.randint(0, h - crop)
            small = img.crop((x, y, x + crop, y + crop)).resize((side, side), Image.BILINEAR)
            folder = out / split / train.classes[train.labels[k]]
            folder.mkdir(parents=True, exist_ok=True)
            buffer = io.BytesIO()
            small.save(buffer, "JPEG", quality=85)
            (folder / f"{split}-{i:07d}.jpg").write_bytes(buffer.getvalue())


def listing_seconds(root: Path) -> float:
    """Time to list the train and val samples: a scan of the folders, or a pack's files read cold."""
    if shards.is_packed(root):
        packed = shards.load(root)
        meta = [root / shards.MANIFEST] + [
            f for part in packed.splits.values() for f in (part.listing, *(s.index for s in part.shards))
        ]
        pagecache.evict(meta)
        start = time.perf_counter()
        packed = shards.load(root)
        for name in ("train", "val"):
            shards.split(packed, name)
        return time.perf_counter() - start
    start = time.perf_counter()
    scan_dataset(root)
    return time.perf_counter() - start


def first_batch_seconds(cfg, split, files: list[Path], device, workers: int) -> dict[str, float]:
    """Per loader, from cold files: time to build it and deliver its first batch (the start-up after the listing).

    Each is built twice and the second time kept: the first in a process also pays one-time costs
    (imports, JIT compilation) that belong to no layout.
    """
    out = {}
    for name in [n for n in SETTINGS for _ in range(2)]:
        pagecache.evict(files)
        start = time.perf_counter()
        loader = build_loader(
            dataclasses.replace(cfg.data, loader=name),
            split,
            train=True,
            batch_size=cfg.train.global_batch_size,
            placement=Placement(rank=0, world_size=1, device=device, workers=workers),
            seed=0,
        )
        loader.set_epoch(0)
        next(iter(loader))
        out[name] = time.perf_counter() - start
        del loader  # left mid-epoch: dropped, never reused
    return out


def bench_layout(root: Path, overrides: list[str], repeats: int, epochs: int, beneath: Path | None = None) -> dict:
    """The listing time and the loaders' images/s on one layout, warm and cold.

    `beneath`: the folder a FUSE mount at root's parent serves; its files are evicted too (else the
    passthrough would read them from the page cache).
    """
    import torch

    cfg = config_module.load(REPO / "configs" / "flowers_resnet18.yaml", [f"data.root={root}", *overrides])
    listing = listing_seconds(root)
    split, _, _ = usable_splits(cfg.data)
    read = files_read(root, split)
    files = read + [beneath / f.relative_to(root.parent) for f in read] if beneath is not None else read
    workers = default_workers(1) if cfg.data.num_workers < 0 else cfg.data.num_workers
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    first_batch = first_batch_seconds(cfg, split, files, device, workers)
    rows = measure(cfg, split, device, workers, repeats, epochs, ("warm", "cold"), files, names=SETTINGS)
    rates = ", ".join(f"{r['setting']} {r['temperature']} {r['images_per_s']['median']:.0f}" for r in rows)
    print(f"{root}: listing {listing:.3f} s; img/s {rates}", flush=True)
    return {
        "images": len(split),
        "files": len(read),
        "bytes": sum(f.stat().st_size for f in read),
        "listing_s": listing,
        "first_batch_cold_s": first_batch,
        "workers": workers,
        "rows": rows,
        "cold_check": cold_check(rows),
    }


def serve_slow(source: Path, mount: Path, open_ms: float) -> None:
    """A read-only passthrough of `source` at `mount` that sleeps `open_ms` in every open (runs until unmounted)."""
    import errno

    from fuse import FUSE, FuseOSError, Operations

    class SlowOpen(Operations):
        def _path(self, path: str) -> str:
            return str(source) + path

        def getattr(self, path, fh=None):
            try:
                st = os.lstat(self._path(path))
            except FileNotFoundError:
                raise FuseOSError(errno.ENOENT) from None
            keys = ("st_mode", "st_size", "st_nlink", "st_uid", "st_gid", "st_atime", "st_mtime", "st_ctime")
            return {k: getattr(st, k) for k in keys}

        def readdir(self, path, fh):
            return [".", "..", *os.listdir(self._path(path))]

        def open(self, path, flags):
            time.sleep(open_ms / 1000)  # a network file system's round trip per open
            return os.open(self._path(path), os.O_RDONLY)

        def read(self, path, size, offset, fh):
            return os.pread(fh, size, offset)

        def release(self, path, fh):
            os.close(fh)

    FUSE(SlowOpen(), str(mount), foreground=True, ro=True, nothreads=False)


def mounted_slow(source: Path, mount: Path, open_ms: float) -> subprocess.Popen:
    """Start serve_slow in its own process (the loaders must not share its GIL) and wait for the mount."""
    mount.mkdir(parents=True, exist_ok=True)
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(source), str(mount), str(open_ms)])
    deadline = time.monotonic() + 30
    while not os.path.ismount(mount):
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            raise SystemExit(f"many_files: the FUSE passthrough did not mount at {mount} (fusepy, /dev/fuse?)")
        time.sleep(0.1)
    return server


def unmount(mount: Path, server: subprocess.Popen) -> None:
    for command in (["fusermount3", "-u"], ["fusermount", "-u"], ["umount"]):
        if shutil.which(command[0]) and subprocess.run([*command, str(mount)], capture_output=True).returncode == 0:
            break
    try:
        server.wait(timeout=10)
    except subprocess.TimeoutExpired:  # fusepy's loop may outlive its mount
        server.terminate()
        server.wait(timeout=10)


def markdown(results: dict) -> str:
    """One row per layout: files, MB, listing time, DALI and PyTorch images/s warm and cold."""
    head = "| layout | images | files read | MB | listing s | first batch s (cold): " + ", ".join(SETTINGS) + " | "
    head += " | ".join(f"{s} {t} img/s" for s in SETTINGS for t in ("warm", "cold"))
    lines = [head + " |", "|" + "---|" * (6 + 2 * len(SETTINGS))]
    for layout, r in results["layouts"].items():
        rates = {(x["setting"], x["temperature"]): x["images_per_s"]["median"] for x in r["rows"]}
        cells = [layout, str(r["images"]), str(r["files"]), f"{r['bytes'] / 1e6:.1f}", f"{r['listing_s']:.3f}"]
        cells.append(", ".join(f"{r['first_batch_cold_s'][s]:.2f}" for s in SETTINGS))
        cells += [f"{rates[s, t]:.0f}" for s in SETTINGS for t in ("warm", "cold")]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"{layout}: {r['cold_check']['line']}" for layout, r in results["layouts"].items()]
    return "\n".join(lines + [""] + notes)


def slow_layouts(work: Path, args: argparse.Namespace) -> dict:
    """Both layouts again, read through the slow FUSE mount of the work folder (no data check: it was checked)."""
    mount = Path(tempfile.mkdtemp(prefix="many-files-mount-"))  # outside what it serves
    server = mounted_slow(work, mount, args.slow_open_ms)
    try:
        overrides = [*args.overrides, "data.check=false"]
        return {
            f"{layout}, +{args.slow_open_ms:g} ms/open": bench_layout(
                mount / layout, overrides, args.repeats, args.epochs, beneath=work
            )
            for layout in LAYOUTS
        }
    finally:
        unmount(mount, server)
        mount.rmdir()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20000, help="train images to make (val gets n/20)")
    parser.add_argument("--source", type=Path, default=default_source(), help="data set whose train photos are cropped")
    parser.add_argument("--sizes", type=int, nargs=2, default=[64, 96], metavar=("MIN", "MAX"), help="image sides, px")
    parser.add_argument("--shard-size", type=float, default=16.0, metavar="MB", help="`data pack --shard-size`")
    parser.add_argument("--repeats", type=int, default=1, help="timed repeats per setting and temperature")
    parser.add_argument("--epochs", type=int, default=1, help="timed epochs per repeat, after one warm-up epoch")
    parser.add_argument("--keep", type=Path, help="make the set here and keep it (default: a temporary folder)")
    parser.add_argument("--out", type=Path, help="JSON result (default benchmarks/results/many_files-<host>.json)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="section.key=value",
        default=["data.image_size=64", "train.global_batch_size=64", "data.rotation=0", "data.color_jitter=0"],
        help="config overrides on configs/flowers_resnet18.yaml (default: 64 px crops and flips, batch 64)",
    )
    parser.add_argument(
        "--slow-open-ms",
        type=float,
        default=0.0,
        help="also measure both layouts through a FUSE mount this slow to open",
    )
    parser.add_argument("--serve", nargs=3, metavar=("SOURCE", "MOUNT", "MS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve_slow(Path(args.serve[0]), Path(args.serve[1]), float(args.serve[2]))
        return {}
    with tempfile.TemporaryDirectory(prefix="many-files-") as tmp:
        work = args.keep or Path(tmp)
        folder, packed = work / "folder", work / "shards"
        start = time.perf_counter()
        make_set(args.source, folder, args.n, tuple(args.sizes), seed=0)
        made_s = time.perf_counter() - start
        print(f"made {args.n} train images in {folder} in {made_s:.1f} s", flush=True)
        pack_s = pack(folder, packed, shard_mb=args.shard_size).seconds
        print(f"packed into {packed} in {pack_s:.1f} s", flush=True)
        results = {
            "n": args.n,
            "source": str(args.source),
            "sizes": args.sizes,
            "overrides": args.overrides,
            "make_s": made_s,
            "pack_s": pack_s,
            "layouts": {
                layout: bench_layout(root, args.overrides, args.repeats, args.epochs)
                for layout, root in zip(LAYOUTS, (folder, packed), strict=True)
            },
            "slow_open_ms": args.slow_open_ms,
            "processor": cpu_info()["model_name"] or "unknown",
            "cores": len(os.sched_getaffinity(0)),
            "load_average": os.getloadavg(),
            "host": socket.gethostname(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        if args.slow_open_ms > 0:
            results["layouts"].update(slow_layouts(work, args))
    print(markdown(results))
    print(f"processor: {results['processor']} ({results['cores']} cores, load {results['load_average'][0]:.1f})")
    out = args.out or REPO / "benchmarks" / "results" / f"many_files-{socket.gethostname()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    main()
