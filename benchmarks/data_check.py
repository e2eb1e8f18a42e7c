"""Time of the data check training runs before its first step: first (every file probed) and cached.

Runs `usable_splits` exactly as training calls it, against a fresh cache file in a temporary
folder (the data root is left untouched), `--rounds` times each way, and writes
benchmarks/results/data_check-<host>.json with the processor and the core count.

    python benchmarks/data_check.py [--data ../shared/flowers] [--rounds 3] [--workers -1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from flowers_dist.config import DataConfig  # noqa: E402
from flowers_dist.data import default_workers  # noqa: E402
from flowers_dist.data.usable import usable_splits  # noqa: E402


def processor() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "flowers"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=-1, help="probe processes (-1 = every core, as training)")
    args = parser.parse_args()
    first, cached = [], []
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory() as tmp:
            cfg = DataConfig(root=args.data, check_cache=str(Path(tmp) / "cache.json"), num_workers=args.workers)
            for times in (first, cached):
                start = time.perf_counter()
                train, val, skipped = usable_splits(cfg)
                times.append(time.perf_counter() - start)
    result = {
        "data": args.data,
        "files": len(train) + len(val) + skipped.count,
        "skipped": skipped.count,
        "first_s": first,
        "cached_s": cached,
        "first_median_s": statistics.median(first),
        "cached_median_s": statistics.median(cached),
        "workers": default_workers(1) if args.workers < 0 else args.workers,
        "cores": len(os.sched_getaffinity(0)),
        "processor": processor(),
        "load_average": os.getloadavg(),
        "host": socket.gethostname(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    print(
        f"data check of {result['files']} files on {result['processor']} ({result['cores']} cores, load {result['load_average'][0]:.1f}): "
        f"first {result['first_median_s']:.2f} s, cached {result['cached_median_s']:.3f} s (median of {args.rounds})"
    )
    out = REPO / "benchmarks" / "results" / f"data_check-{socket.gethostname()}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
