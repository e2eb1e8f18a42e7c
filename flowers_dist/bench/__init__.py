"""`flowers-dist bench MODE`: measure the loader, the model step, the training loop, its scaling and start-up, and say where the time goes.

Every mode excludes warm-up, synchronises the device before reading a clock, repeats, and
reports the median with its range; it prints a table and writes every figure, with the machine,
the versions and the config, to a JSON file (`--out`, default runs/bench-<mode>-<time>/bench.json).
`tta` (tta.py) is the exception: it times whole `train` runs of several configs to a target val accuracy.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import Config

MODES = ("loader", "step", "train", "scaling", "startup", "tta")
if TYPE_CHECKING:
    import torch

NUM_CLASSES = 5  # the flowers head; the step mode needs no data set


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "mode",
        choices=MODES,
        help="loader: DALI vs PyTorch vs decode only; step: model step vs matmul peak; "
        "train: the loop's time split; scaling: train on 1..N processes; startup: time to the first step; "
        "tta: time to a target val accuracy, per config, by real train runs",
    )
    parser.add_argument(
        "--config",
        type=Path,
        action="append",
        required=True,
        help="YAML config (configs/*.yaml); tta: one per config to compare (--config A --config B)",
    )
    parser.add_argument(
        "--out", type=Path, help="JSON result file (default runs/bench-<mode>-<time>/bench.json under train.output_dir)"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        help="loader/step/startup: timed repeats (default 3; median and range reported); "
        "tta: runs per config, interleaved, seeds train.seed + 0..K-1 (default 1; medians reported)",
    )
    parser.add_argument(
        "--epochs", type=int, default=1, help="loader: timed epochs per repeat, after one warm-up epoch"
    )
    parser.add_argument(
        "--temperature",
        choices=["warm", "cold", "both"],
        default="warm",
        help="loader: warm = page cache; cold = each file evicted before every timed epoch (checked with mincore)",
    )
    parser.add_argument("--warmup", type=int, default=2, help="step/train/scaling: untimed steps first")
    parser.add_argument("--steps", type=int, default=5, help="step: steps per repeat; train/scaling: timed steps")
    parser.add_argument(
        "--precisions", nargs="+", default=["fp32"], choices=["fp32", "bf16", "fp16"], help="step: autocast precisions"
    )
    parser.add_argument(
        "--formats",
        nargs="+",
        default=["nchw", "channels_last"],
        choices=["nchw", "channels_last"],
        help="step: memory formats",
    )
    parser.add_argument(
        "--compile", action="store_true", help="step: torch.compile the model (slow to compile on the CPU)"
    )
    parser.add_argument(
        "--matmul-size", type=int, default=2048, help="step: side of the square matmul that sets the peak"
    )
    parser.add_argument("--max-processes", type=int, default=2, help="scaling: world sizes 1..N")
    parser.add_argument(
        "--target", type=float, action="append", help="tta: val accuracy in [0, 1] to time (e.g. 0.7); repeatable"
    )
    parser.add_argument("--nprocs", type=int, default=1, help="tta: processes per run (accelerate launch above 1)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")


def _device(cfg: Config) -> torch.device:
    import torch

    return torch.device("cuda" if cfg.train.device == "auto" and torch.cuda.is_available() else "cpu")


def _loader_report(results: dict[str, Any]) -> str:
    """Images/s per loader setting and temperature, and the DALI / PyTorch ratio."""
    from .loader import report

    return report(results)


def _step_report(results: dict[str, Any]) -> str:
    """Images/s and FLOP/s per precision and memory format, against the matmul peak."""
    from .common import table

    rows = [
        {
            **r,
            "img_s": r["images_per_s"]["median"],
            "spread": f"{r['images_per_s']['min']:.1f}-{r['images_per_s']['max']:.1f}",
            "gflops": r["achieved_flops_per_s"] / 1e9,
            "peak": 100 * r["fraction_of_matmul_peak"],
        }
        for r in results["rows"]
    ]
    peaks = ", ".join(
        f"{p} {v['flops_per_s']['max'] / 1e9:.0f} GFLOP/s (median {v['flops_per_s']['median'] / 1e9:.0f})"
        for p, v in results["matmul_peak"].items()
    )
    return (
        table(
            rows,
            [
                ("precision", "precision", "s"),
                ("memory_format", "format", "s"),
                ("img_s", "img/s", ".1f"),
                ("spread", "range", "s"),
                ("gflops", "GFLOP/s", ".1f"),
                ("peak", "% of matmul", ".0f"),
            ],
        )
        + f"\nmatmul peak ({results['matmul_peak'][next(iter(results['matmul_peak']))]['size']}^2): {peaks}; "
        f"{results['rows'][0]['flops_per_image'] / 1e9:.2f} GFLOP per image (fwd + bwd, counted)"
    )


def _train_report(results: dict[str, Any]) -> str:
    """The loop's throughput, its step-time split, the bottleneck and the advice, in one paragraph."""
    f = results["fractions"]
    return (
        f"{results['world_size']} process(es), {results['loader']} loader, global batch {results['global_batch']} = "
        f"{results['micro_batch_size']} x {results['world_size']} x {results['grad_accum_steps']} accumulation step(s), "
        f"sync_bn {'on' if results['sync_bn'] else 'off'}: {results['images_per_s']:.1f} img/s, "
        f"optimizer step {1000 * results['step_time']:.0f} ms = data wait {100 * f['data wait']:.0f}% "
        f"+ compute {100 * f['compute']:.0f}% + communication {100 * f['communication']:.0f}%\n"
        f"bottleneck: {results['bottleneck']}; most likely to move it: {results['advice']}"
    )


def _startup_report(results: dict[str, Any]) -> str:
    """Time to the first step, the imports' share and the largest imports."""
    largest = ", ".join(f"{r['package']} {r['cumulative_s']:.1f} s" for r in results["largest_imports"])
    first, imports = results["time_to_first_step_s"], results["import_s"]
    return (
        f"time to first step {first['median']:.1f} s (range {first['min']:.1f}-{first['max']:.1f}), of which imports "
        f"{imports['median']:.1f} s (range {imports['min']:.1f}-{imports['max']:.1f}); largest imports: {largest}"
    )


def _scaling_report(results: dict[str, Any]) -> str:
    """Images/s, efficiency and bottleneck per world size."""
    from .common import table

    rows = [{**r, "eff": 100 * r["efficiency"]} for r in results["rows"]]
    return table(
        rows,
        [
            ("processes", "processes", "d"),
            ("images_per_s", "img/s", ".1f"),
            ("eff", "efficiency %", ".0f"),
            ("bottleneck", "bottleneck", "s"),
        ],
    )


_REPORTS = {
    "loader": _loader_report,
    "step": _step_report,
    "train": _train_report,
    "startup": _startup_report,
    "scaling": _scaling_report,
}


def _report(mode: str, results: dict[str, Any]) -> str:
    """The printed summary of one mode's results."""
    return _REPORTS[mode](results)


def _bench_loader(args: argparse.Namespace, cfg: Config, device: torch.device) -> dict[str, Any]:
    """DALI against the PyTorch loader, on the configured data and worker count."""
    from ..data import default_workers
    from .loader import bench_loader

    workers = default_workers(1) if cfg.data.num_workers < 0 else cfg.data.num_workers
    return bench_loader(cfg, device, workers, args.repeats, args.epochs, args.temperature)


def _bench_step(args: argparse.Namespace, cfg: Config, device: torch.device) -> dict[str, Any]:
    """The model step alone on synthetic batches of the configured model and image size."""
    from .step import bench_step

    return bench_step(
        cfg.model,
        NUM_CLASSES,
        cfg.data.image_size,
        cfg.train.global_batch_size,
        device,
        precisions=args.precisions,
        formats=args.formats,
        compile_model=args.compile,
        warmup=args.warmup,
        steps=args.steps,
        repeats=args.repeats,
        matmul_size=args.matmul_size,
    )


def _bench_startup(args: argparse.Namespace, cfg: Config, device: torch.device) -> dict[str, Any]:
    """Time to the first step of fresh processes, run in the result's folder."""
    from .common import out_path
    from .startup import bench_startup

    path = out_path(args.out, cfg, args.mode)
    return bench_startup(args.config, args.overrides, path.parent, args.repeats)


def _bench_scaling(args: argparse.Namespace, cfg: Config, device: torch.device) -> dict[str, Any]:
    """`bench train` on 1..--max-processes processes, run under the result's folder."""
    from .common import out_path
    from .scaling import bench_scaling

    path = out_path(args.out, cfg, args.mode)
    return bench_scaling(
        args.config,
        args.overrides,
        cfg.train.global_batch_size,
        args.max_processes,
        args.warmup,
        args.steps,
        path.parent / "scaling",
    )


# The modes measured in this one process; `train` runs on every process of its world (_run_train).
_MEASURES = {"loader": _bench_loader, "step": _bench_step, "startup": _bench_startup, "scaling": _bench_scaling}


def _write_and_print(
    args: argparse.Namespace, cfg: Config, device: torch.device, results: dict[str, Any], world: int = 1, nodes: int = 1
) -> Path:
    """Write the JSON result, print the mode's summary and where the file went."""
    from .common import out_path, write_result

    path = write_result(out_path(args.out, cfg, args.mode), args.mode, cfg, device, results, world, nodes)
    print(_report(args.mode, results))
    print(f"wrote {path}")
    return path


def _run_train(args: argparse.Namespace, cfg: Config) -> Path | None:
    """`bench train` on every process of the world; only the main process writes and prints."""
    from .loop import bench_train

    results, accelerator = bench_train(cfg, args.warmup, args.steps)
    if results is None:
        accelerator.end_training()
        return None
    path = _write_and_print(args, cfg, accelerator.device, results, results["world_size"], results["num_nodes"])
    accelerator.end_training()
    return path


def run(args: argparse.Namespace) -> Path | None:
    """Run one mode; returns the JSON file written (None on the non-main processes of `train`)."""
    from .. import config as config_module

    if args.repeats is None:
        args.repeats = 1 if args.mode == "tta" else 3
    if args.mode == "tta":
        from .tta import run as run_tta

        return run_tta(args)
    if len(args.config) > 1:
        raise config_module.ConfigError(f"bench {args.mode} takes one --config (several are for bench tta)")
    args.config = args.config[0]
    cfg = config_module.load(args.config, args.overrides)
    if args.mode == "train":
        return _run_train(args, cfg)
    device = _device(cfg)
    return _write_and_print(args, cfg, device, _MEASURES[args.mode](args, cfg, device))
