"""`bench tta`: time to a target val accuracy, as MLPerf Training ranks systems, for several configs on one machine.

Each config is trained by the real command, a fresh `flowers-dist train` process (under `accelerate launch` for
--nprocs > 1, as `bench scaling` launches), into its own run folder, with the same command-line overrides for all;
every figure is read back from the runs' own metrics.jsonl. Repeats are interleaved (A B A B, not A A B B) so that
drift of a shared machine (other jobs, heat, the page cache) falls on every config alike, and repeat k gives every
config the same seed (train.seed + k).

The run evaluates once per epoch (the training loop's interval; a finer one would change the loop), so the time to
a target is that of the first epoch whose val accuracy is at or above it. Three clocks are kept per evaluation:
`elapsed`, the run's own clock (run_clock.py: it starts once the imports, the Accelerator, the data check and the
run-folder claim are done, and counts building the model and loaders, every step, every evaluation and the
background checkpoint writes), the one reported as time to target, as train's own `time_to_target` is; `train_time`,
the training steps alone (evaluations excluded); and `wall`, from launching the process (imports and start-up
included) to the evaluation's record. Images to target = optimizer steps x global batch up to that epoch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from .. import config as config_module
from ..config import Config, ConfigError
from .advice import BF16_FLAGS, cpu_bf16_flags
from .common import stamp, write_json


# -- the pure part: curves, first evaluation at a target, the summary -------------------------------------------
def curve(epochs: list[dict[str, Any]], global_batch: int, launched: float) -> list[dict[str, Any]]:
    """One point per evaluation from a run's `epoch` records (the last record of each epoch, as every reader keeps).

    `launched` is the wall time (time.time()) at which the process was started.
    """
    points, trained = [], 0.0
    for r in epochs:
        trained += r["train_time"]
        points.append(
            {
                "epoch": r["epoch"],
                "step": r["step"],
                "images": r["step"] * global_batch,
                "val_acc": r["val_acc"],
                "elapsed": r["elapsed"],
                "train_time": trained,
                "wall": r["time"] - launched,
            }
        )
    return points


def first_at_or_above(points: list[dict[str, Any]], target: float) -> dict[str, Any] | None:
    """The first evaluation whose val accuracy is at or above `target`; None where none is."""
    return next((p for p in points if p["val_acc"] >= target), None)


def best_point(points: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The highest val accuracy, the earliest epoch on a tie (as train's own best)."""
    return max(points, key=lambda p: (p["val_acc"], -p["epoch"])) if points else None


def _median(values: list[float]) -> float | None:
    """The median with a miss counted as infinitely late; None when the median itself is a miss."""
    m = statistics.median(values)
    return None if m == float("inf") else m


def summarise(runs: list[dict[str, Any]], labels: list[str], targets: list[float]) -> list[dict[str, Any]]:
    """One row per config and target: how many repeats reached it, their medians, and the best accuracy seen.

    A repeat that never reached the target counts as infinitely late, so the median time is a time only where
    at least half the repeats reached the target.
    """
    rows = []
    for label in labels:
        mine = [r for r in runs if r["config"] == label]
        best = max((r["best"] for r in mine if r["best"]), key=lambda b: b["val_acc"], default=None)
        for target in targets:
            hits = [first_at_or_above(r["curve"], target) for r in mine]
            late = float("inf")
            rows.append(
                {
                    "config": label,
                    "target": target,
                    "repeats": len(mine),
                    "reached": sum(h is not None for h in hits),
                    "time_to_target_s": _median([h["elapsed"] if h else late for h in hits]),
                    "train_time_to_target_s": _median([h["train_time"] if h else late for h in hits]),
                    "wall_to_target_s": _median([h["wall"] if h else late for h in hits]),
                    "images_to_target": _median([h["images"] if h else late for h in hits]),
                    "epoch_to_target": _median([h["epoch"] if h else late for h in hits]),
                    "best_val_acc": best["val_acc"] if best else None,
                    "best_epoch": best["epoch"] if best else None,
                    "epochs": max((len(r["curve"]) for r in mine), default=0),
                }
            )
    return rows


def time_cell(row: dict[str, Any]) -> str:
    """The table's time to target: seconds (and how many repeats reached it), or that it was not reached."""
    best = "no evaluation" if row["best_val_acc"] is None else f"best {row['best_val_acc']:.4f}"
    if row["best_epoch"] is not None:
        best += f" at epoch {row['best_epoch'] + 1}"
    if row["time_to_target_s"] is None:
        missed = row["repeats"] - row["reached"]
        return (
            f"not reached ({best})" if row["reached"] == 0 else f"not reached in {missed} of {row['repeats']} ({best})"
        )
    shown = f"{row['time_to_target_s']:.1f} s (epoch {row['epoch_to_target'] + 1:g})"
    return shown if row["repeats"] == 1 else f"{shown}, {row['reached']}/{row['repeats']} reached"


def report(rows: list[dict[str, Any]]) -> str:
    """The printed table: config, target, time to target, images to target, best val accuracy, epochs."""
    from .common import table

    cells = [
        {
            **r,
            "time": time_cell(r),
            "images": "-" if r["images_to_target"] is None else f"{r['images_to_target']:.0f}",
        }
        for r in rows
    ]
    return table(
        cells,
        [
            ("config", "config", "s"),
            ("target", "target", ".3f"),
            ("time", "time to target (run clock)", "s"),
            ("images", "images to target", "s"),
            ("best_val_acc", "best val acc", ".4f"),
            ("epochs", "epochs", "d"),
        ],
    )


def differences(resolved: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The `section.key`s whose resolved values differ between configs, with each config's value."""

    def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    flats = {label: flat(d) for label, d in resolved.items()}
    keys = sorted({k for f in flats.values() for k in f})
    return {
        k: {label: f.get(k) for label, f in flats.items()}
        for k in keys
        if len({json.dumps(f.get(k)) for f in flats.values()}) > 1
    }


def plan(labels: list[str], repeats: int) -> list[tuple[int, str]]:
    """The order of the runs, (repeat, config): interleaved, A B A B, so that a machine's drift is shared."""
    return [(k, label) for k in range(repeats) for label in labels]


def labels_of(paths: list[Path]) -> list[str]:
    """A name per config: its file's stem, with -2, -3 ... where two files share one."""
    labels: list[str] = []
    for path in paths:
        label, n = path.stem, 2
        while label in labels:
            label, n = f"{path.stem}-{n}", n + 1
        labels.append(label)
    return labels


def cpu_info(cpuinfo: str | None = None) -> dict[str, Any]:
    """The CPU's model name and its bf16 flags from /proc/cpuinfo (or the given text); None where it cannot be read."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:  # not Linux
            return {"model_name": platform.processor() or None, **{f: None for f in BF16_FLAGS}}
    fields = [line.split(":", 1) for line in cpuinfo.splitlines() if ":" in line]
    model = next((v.strip() for k, v in fields if k.strip() == "model name"), None)
    have = cpu_bf16_flags(cpuinfo)  # the bf16 instructions that change what a CPU trains at
    return {"model_name": model, **{f: f in have for f in BF16_FLAGS}}


# -- running the configs ------------------------------------------------------------------------------------------
def _train_env(nprocs: int) -> dict[str, str]:
    """The runs' environment: no W&B (its uploads would be timed too), and on a CPU the cores split among the processes."""
    import torch

    from ..data import default_workers

    env = {**os.environ, "WANDB_MODE": "disabled"}
    if nprocs > 1 and not torch.cuda.is_available():
        env["OMP_NUM_THREADS"] = str(default_workers(nprocs))
    return env


def train_run(path: Path, cfg: Config, overrides: list[str], name: str, root: Path, nprocs: int) -> dict[str, Any]:
    """Train one config in a fresh process into root/name (its output in root/name.log); its record as a result."""
    from ..report import read_metrics
    from .scaling import launch_command

    pinned = [f"train.output_dir={root}", f"train.name={name}", f"train.seed={cfg.train.seed}", "train.resume=never"]
    log = root / f"{name}.log"
    launched, start = time.time(), time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.run(
            launch_command(nprocs, ["train", "--config", str(path), *overrides, *pinned]),
            env=_train_env(nprocs),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        raise RuntimeError(f"bench tta: training {path} ({name}) exited {proc.returncode}; {log} ends:\n{tail}")
    m = read_metrics(root / name)
    points = curve(m["epochs"], cfg.train.global_batch_size, launched)
    end = m["end"] or {}
    return {
        "run_dir": str(root / name),
        "log": str(log),
        "seed": cfg.train.seed,
        "process_wall_s": wall,
        "curve": points,
        "best": best_point(points),
        "run_target_accuracy": end.get("target_accuracy"),
        "run_time_to_target": end.get("time_to_target"),
        "total_time": end.get("total_time"),
    }


def plot(runs: list[dict[str, Any]], labels: list[str], targets: list[float], path: Path) -> Path:
    """Val accuracy against the run clock, one colour per config (one line per repeat), each target a dashed line."""
    from ..report import _pyplot, _save

    fig, ax = _pyplot().subplots(figsize=(7.5, 4.5))
    colours = {label: f"C{i % 10}" for i, label in enumerate(labels)}
    for label in labels:
        for k, run in enumerate(r for r in runs if r["config"] == label):
            xs, ys = [p["elapsed"] for p in run["curve"]], [p["val_acc"] for p in run["curve"]]
            ax.plot(xs, ys, "o-", color=colours[label], alpha=0.8, label=label if k == 0 else None)
    for target in targets:
        ax.axhline(target, color="grey", ls="--", lw=1)
        ax.annotate(f"target {target:.3f}", (0, target), xycoords=("axes fraction", "data"), fontsize=8, va="bottom")
    ax.set(xlabel="run clock (s): model and loader set-up, training and evaluation", ylabel="val accuracy")
    ax.set(title="time to accuracy", ylim=(0, 1.02))
    ax.set_xlim(left=0)
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _environment(run_dir: Path) -> dict[str, Any]:
    """The first run's own environment.json (versions, devices, world size, as train saw them), the CPU and the load."""
    saved = json.loads((run_dir / "environment.json").read_text())
    return {**saved, "cpu": cpu_info(), "load_average_at_end": os.getloadavg()}  # other jobs lower every figure


def _check(args: argparse.Namespace) -> None:
    """The bench's own arguments, before any training starts."""
    if not args.target:
        raise ConfigError("bench tta needs --target ACC (a val accuracy in [0, 1], e.g. 0.7)")
    for target in args.target:
        if not 0 <= target <= 1:
            raise ConfigError(f"--target {target:g}: a val accuracy is a fraction in [0, 1] (e.g. 0.7 for 70 %)")
    if args.repeats < 1 or args.nprocs < 1:
        raise ConfigError(f"--repeats and --nprocs must be >= 1, got {args.repeats} and {args.nprocs}")


def run(args: argparse.Namespace) -> Path:
    """Train every config --repeats times, interleaved; write the JSON and the plot, print the table."""
    _check(args)
    paths = list(args.config)
    labels = labels_of(paths)
    cfgs = {label: config_module.load(path, args.overrides) for label, path in zip(labels, paths)}  # errors first
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    # Run folders (checkpoints included) go under the first config's train.output_dir, never beside an --out
    # that may sit in benchmarks/results.
    root = (Path(cfgs[labels[0]].train.output_dir) / f"bench-tta-{stamp}").resolve()
    out = args.out or root / "bench.json"
    root.mkdir(parents=True, exist_ok=True)
    # The run's own time_to_target (its end record) follows the lowest target train accepts, as a cross-check.
    own = [f"tracking.target_accuracy={min(t for t in args.target if t > 0)}"] if max(args.target) > 0 else []
    runs, path_of = [], dict(zip(labels, paths))
    for k, label in plan(labels, args.repeats):
        base = cfgs[label]
        cfg = dataclasses.replace(base, train=dataclasses.replace(base.train, seed=base.train.seed + k))
        name = f"{label}-r{k}"
        print(f"bench tta: {label} repeat {k + 1}/{args.repeats} (seed {cfg.train.seed}) -> {root / name}")
        result = train_run(path_of[label], cfg, [*args.overrides, *own], name, root, args.nprocs)
        runs.append({"config": label, "repeat": k, **result})
    rows = summarise(runs, labels, args.target)
    out.parent.mkdir(parents=True, exist_ok=True)
    png = plot(runs, labels, args.target, out.with_suffix(".png"))
    write_json(out, _record(args, {label: (path_of[label], cfgs[label]) for label in labels}, runs, rows, png))
    print(report(rows))
    print(f"wrote {out} and {png}; runs in {root}")
    return out


def _record(
    args: argparse.Namespace,
    configs: dict[str, tuple[Path, Config]],
    runs: list[dict[str, Any]],
    rows: list[dict[str, Any]],
    png: Path,
) -> dict[str, Any]:
    """The JSON result: the command, the machine, every config resolved and how they differ, the summary, the runs."""
    resolved = {label: cfg.to_dict() for label, (_, cfg) in configs.items()}
    return {
        **stamp("tta"),
        "environment": _environment(Path(runs[0]["run_dir"])),
        "configs": [
            {"label": label, "path": str(path), "config": resolved[label]} for label, (path, _) in configs.items()
        ],
        "results": {
            "targets": list(args.target),
            "repeats": args.repeats,
            "nprocs": args.nprocs,
            "overrides": list(args.overrides),
            "differences": differences(resolved),
            "evaluation": "every epoch (the training loop's interval)",
            "time_to_target": "the run's own clock (`elapsed`); `train_time` and `wall` kept beside it",
            "summary": rows,
            "runs": runs,
            "plot": str(png),
        },
    }
