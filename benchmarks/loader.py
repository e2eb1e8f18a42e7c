"""Loader-only throughput, DALI against the PyTorch loader, on the real train split, same cores and recipe.

Both loaders are built through `build_loader`, exactly as training builds them, and both deliver
the contract's batches (normalised float images and labels on the device). Settings (loader and
thread/worker count, on the same cores) run in turns, `--rounds` times, so that load from other
processes falls on all of them alike; each turn builds the loader, runs one warm-up epoch
(pipeline build, worker start-up, page cache) and then `--epochs` timed epochs, counting the
images the loader yields. Prints median and spread per setting and the ratio of the best DALI
setting to the best PyTorch one, and writes benchmarks/results/loader-<host>.json. On the CPU the
full recipe also runs as "dali-ops": the same DALI graph ending with DALI's own rotate and colour
operators instead of the fused kernel training uses, which shows what that kernel gains.

    python benchmarks/loader.py [--data ../shared/flowers] [--rounds 3] [--epochs 2] [--cores N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from flowers_dist.bench.loader import loader_rates  # noqa: E402
from flowers_dist.config import DataConfig  # noqa: E402
from flowers_dist.data import Placement, default_workers, scan_split  # noqa: E402

RECIPES = {
    # The reference recipe (configs/flowers_resnet18.yaml) and the plain crop + flip.
    "recipe": dict(image_size=224, rotation=15.0, color_jitter=0.2),
    "plain": dict(image_size=224, rotation=0.0, color_jitter=0.0),
}


def measure(
    loader_kind: str, recipe: str, split, batch: int, workers: int, epochs: int, device: torch.device
) -> list[float]:
    """Images/s of `epochs` epochs after one warm-up epoch (the same measurement as `flowers-dist bench loader`).

    "dali-ops" is the DALI loader with DALI's own rotate and colour operators instead of the fused
    CPU kernel that training uses (flowers_dist/data/dali_fused.py).
    """
    cfg = DataConfig(loader="dali" if loader_kind == "dali-ops" else loader_kind, **RECIPES[recipe])
    placement = Placement(rank=0, world_size=1, device=device, workers=workers)
    return loader_rates(cfg, split, batch, placement, epochs, dali_fused=False if loader_kind == "dali-ops" else None)


def _commit() -> str:
    """HEAD, marked -dirty when the working tree differs from it (the figures belong to that tree)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _parse_args() -> argparse.Namespace:
    """The command line (see the module's usage line)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", type=Path, default=REPO.parent / "shared" / "flowers", help="data-set root (its train/ is read)"
    )
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--cores", type=int, default=default_workers(1), help="DALI threads = PyTorch workers")
    parser.add_argument(
        "--extra",
        type=int,
        default=1,
        help="also try cores+1 .. cores+extra DALI threads and PyTorch workers; the best of each is compared",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per round")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--out", type=Path, default=REPO / "benchmarks" / "results" / f"loader-{socket.gethostname()}.json"
    )
    return parser.parse_args()


def _settings(args: argparse.Namespace, device: torch.device) -> list[tuple[str, str, int]]:
    """Every (recipe, loader, workers) to measure."""
    counts = range(args.cores, args.cores + args.extra + 1)
    settings = [(recipe, kind, w) for recipe in args.recipes for kind in ("dali", "torch") for w in counts]
    if "recipe" in args.recipes and device.type == "cpu":  # what the fused kernel gains, at the best DALI count
        settings += [("recipe", "dali-ops", w) for w in counts]
    return settings


def _measure_rounds(
    args: argparse.Namespace, settings: list[tuple[str, str, int]], split, device: torch.device
) -> list[dict]:
    """Every setting in turn, --rounds times; one row per setting with its rates, median and range."""
    rates = {s: [] for s in settings}
    for round_ in range(args.rounds):
        for recipe, kind, workers in settings:
            rates[recipe, kind, workers] += measure(kind, recipe, split, args.batch, workers, args.epochs, device)
            print(
                f"  round {round_ + 1}: {recipe:<7} {kind:<6} {workers} workers: "
                f"{statistics.median(rates[recipe, kind, workers]):.0f} img/s so far",
                file=sys.stderr,
            )
    return [
        dict(recipe=recipe, loader=kind, workers=w, rates=r, median=statistics.median(r), min=min(r), max=max(r))
        for (recipe, kind, w), r in rates.items()
    ]


def _print_table(args: argparse.Namespace, rows: list[dict], images: int, device, load_before) -> None:
    """The conditions of the run, then one line per setting."""
    print(
        f"\n{images} train images from {args.data}, batch {args.batch}, {args.cores} cores, device {device}, "
        f"{args.rounds} rounds x {args.epochs} epochs, each after 1 warm-up epoch; load average "
        f"{load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after\n"
    )
    print(f"{'recipe':<8}{'loader':<8}{'threads':>8}{'median img/s':>14}{'min':>8}{'max':>8}")
    for r in rows:
        print(f"{r['recipe']:<8}{r['loader']:<8}{r['workers']:>8}{r['median']:>14.0f}{r['min']:>8.0f}{r['max']:>8.0f}")


def _best(rows: list[dict], recipe: str, loader: str) -> float:
    """The best median of one loader on one recipe, over its worker counts."""
    return max(r["median"] for r in rows if r["recipe"] == recipe and r["loader"] == loader)


def _ratios(recipes: list[str], rows: list[dict]) -> dict[str, float]:
    """Best DALI over best PyTorch per recipe, printed as they are computed."""
    ratios = {}
    for recipe in recipes:
        ratios[recipe] = _best(rows, recipe, "dali") / _best(rows, recipe, "torch")
        print(f"{recipe}: DALI / best PyTorch = {ratios[recipe]:.2f}x")
    return ratios


def _fused_gain(rows: list[dict]) -> float | None:
    """Best DALI over best "dali-ops" on the recipe, printed; None when dali-ops did not run."""
    if not any(r["loader"] == "dali-ops" for r in rows):
        return None
    gain = _best(rows, "recipe", "dali") / _best(rows, "recipe", "dali-ops")
    print(f"recipe: DALI with the fused CPU finish / with DALI's rotate and colour operators = {gain:.2f}x")
    return gain


def _versions() -> dict[str, str]:
    """The versions the figures depend on."""
    import nvidia.dali
    import PIL
    import torchvision

    return dict(
        python=platform.python_version(),
        torch=torch.__version__,
        torchvision=torchvision.__version__,
        dali=nvidia.dali.__version__,
        pillow=PIL.__version__,
    )


def _write_result(args: argparse.Namespace, device: torch.device, images: int, figures: dict) -> None:
    """The JSON file: machine, commit, command, versions and conditions, then the figures."""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            dict(
                when=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                host=socket.gethostname(),
                cpu=platform.processor() or platform.machine(),
                cores=args.cores,
                device=str(device),
                gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                commit=_commit(),
                command=" ".join([Path(sys.executable).name, *sys.argv]),
                versions=_versions(),
                data=str(args.data),
                images=images,
                batch=args.batch,
                rounds=args.rounds,
                epochs=args.epochs,
                recipes={k: RECIPES[k] for k in args.recipes},
                **figures,
            ),
            indent=1,
        )
        + "\n"
    )
    print(f"wrote {args.out}")


def main() -> None:
    """Measure every setting in turns, print the table and the ratios, write the JSON file."""
    args = _parse_args()
    split = scan_split(args.data / "train")
    device = torch.device(args.device)
    load_before = os.getloadavg()  # other processes on the machine make every figure lower
    rows = _measure_rounds(args, _settings(args, device), split, device)
    _print_table(args, rows, len(split), device, load_before)
    ratios = _ratios(args.recipes, rows)
    fused_gain = _fused_gain(rows)
    figures = dict(
        load_average_before=load_before,
        load_average_after=os.getloadavg(),
        rows=rows,
        ratio_dali_over_best_torch=ratios,
        fused_finish_speedup=fused_gain,
    )
    _write_result(args, device, len(split), figures)


if __name__ == "__main__":
    main()
