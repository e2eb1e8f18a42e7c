"""The `flowers-dist` command line: train, sweep, eval, predict, report, bench, data fetch, check and pack."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

# Only light imports here: torch and timm load with the command that needs them.
# Errors a user can fix get one line, not a traceback.
from .errors import (
    EXIT_DISK,
    EXIT_HUNG,
    EXIT_PREEMPTED,
    EXIT_USER_ERROR,
    USER_ERRORS,
    ConfigError,
    DataError,
    DiskError,
    HungError,
    PreemptedError,
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flowers-dist", description="Distributed image-classification training (flowers)."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_train, _add_sweep, _add_eval, _add_predict, _add_report, _add_bench, _add_data):
        add(sub)
    return parser


def _add_train(sub) -> None:
    train = sub.add_parser(
        "train",
        help="train, or resume, a run",
        description="Train with a YAML config; extra arguments section.key=value override it.",
    )
    train.add_argument(
        "--config", type=Path, help="YAML config (configs/*.yaml); defaults to the run's own config with --resume"
    )
    train.add_argument(
        "--resume", type=Path, metavar="RUN_DIR", help="continue the run in this folder from its last checkpoint"
    )
    train.add_argument(
        "--force", action="store_true", help="resume even with overrides that change what the run computes"
    )
    train.add_argument("overrides", nargs="*", metavar="section.key=value")


def _add_sweep(sub) -> None:
    from .sweep import add_arguments

    add_arguments(
        sub.add_parser(
            "sweep",
            help="a grid or random search over config keys: runs one after another, or one SLURM job array",
            description="Expand SPEC.yaml into a sweep folder of runs and run the unfinished ones (docs/cluster.md#sweeps).",
        )
    )


def _add_eval(sub) -> None:
    ev = sub.add_parser("eval", help="evaluate a checkpoint on a labelled folder")
    ev.add_argument(
        "checkpoint",
        help="a checkpoint file, or a W&B artifact [entity/][project/]name:alias (e.g. model-<run id>:best)",
    )
    ev.add_argument(
        "--data",
        required=True,
        help="data-set root (its val/ is used), a packed folder (`data pack`; its val shards) or a folder of class folders",
    )
    ev.add_argument("--batch-size", type=int, default=64)
    ev.add_argument("--workers", type=int, default=-1, help="decode workers per process (-1 = cores per process)")
    ev.add_argument("--device", choices=["auto", "cpu"], default="auto")
    ev.add_argument("--json", help="also write the result as JSON here")
    ev.add_argument(
        "--report",
        type=Path,
        metavar="DIR",
        help="also write the val images the model gets wrong to DIR/mistakes.html and .png (and to W&B when tracking is on)",
    )
    ev.add_argument(
        "--loader",
        choices=["auto", "dali", "torch"],
        default="auto",
        help="decoder: auto = DALI where it imports, else PyTorch (files that do not decode are skipped and named)",
    )
    _add_scoring(ev)


def _add_scoring(parser: argparse.ArgumentParser) -> None:
    """eval's and predict's choice of what scores an image; the defaults are how training evaluated the weights."""
    parser.add_argument(
        "--weights",
        choices=["model", "ema"],
        default="model",
        help="the trained weights, or the run's weight average (model.ema > 0; val_acc_ema in its record)",
    )
    parser.add_argument(
        "--hflip-tta",
        choices=["auto", "on", "off"],
        default="auto",
        help="average the logits of each image and its horizontal flip; auto = the run's train.eval_hflip_tta",
    )


def _add_predict(sub) -> None:
    pr = sub.add_parser("predict", help="top-k classes for images or folders of images")
    pr.add_argument(
        "checkpoint",
        help="a checkpoint file, or a W&B artifact [entity/][project/]name:alias (e.g. model-<run id>:best)",
    )
    pr.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER")
    pr.add_argument("--topk", type=int, default=3)
    pr.add_argument("--json", action="store_true", help="print JSON instead of text")
    _add_scoring(pr)


def _add_report(sub) -> None:
    rep = sub.add_parser("report", help="plots and a summary of a run (finished or not) from its metrics.jsonl")
    rep.add_argument("run_dir", type=Path, metavar="RUN_DIR", nargs="?")
    rep.add_argument(
        "--compare",
        type=Path,
        metavar="SWEEP_DIR",
        help="instead: a sweep's runs side by side (SWEEP_DIR/compare.md, .csv, .png) and its best config",
    )


def _add_bench(sub) -> None:
    bench = sub.add_parser(
        "bench",
        help="measure loader, model step, training loop or scaling, and say where the time goes; time to accuracy (tta)",
        description="Benchmark one part of training with a YAML config; extra arguments section.key=value override it.",
    )
    from .bench import add_arguments

    add_arguments(bench)


def _add_data(sub) -> None:
    data = sub.add_parser("data", help="data-set tools")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    fetch = data_sub.add_parser("fetch", help="download flower_photos and write a stratified train/val split")
    fetch.add_argument("dest", type=Path)
    fetch.add_argument("--url", help="archive URL (default: TensorFlow's flower_photos.tgz)")
    fetch.add_argument("--sha256", help="expected SHA-256 of the archive (default: the pinned one)")
    fetch.add_argument("--val-fraction", type=float, default=0.2)
    fetch.add_argument("--seed", type=int, default=0)
    fetch.add_argument("--keep-archive", action="store_true")
    from .data.check_cli import add_arguments as add_check_arguments

    add_check_arguments(
        data_sub.add_parser(
            "check", help="find unreadable, odd, duplicate and leaked files; exit 0 clean, 1 skippable, 2 fatal"
        )
    )
    from .data.pack import add_arguments as add_pack_arguments

    add_pack_arguments(
        data_sub.add_parser("pack", help="the usable files of train/ and val/ as WebDataset tar shards with a manifest")
    )


def _train(args: argparse.Namespace) -> None:
    from . import config, resume_check
    from .preemption import ignore_stop_signals
    from .train import train

    if args.resume is not None:
        run_config = args.resume / "config.yaml"
        if not run_config.is_file():
            raise ConfigError(f"--resume {args.resume}: no config.yaml there; is it a run folder?")
        # config.yaml stays as the run was started; earlier resumes' overrides are in resumes.jsonl.
        earlier = resume_check.previous_overrides(args.resume)
        cfg, config_name = config.load(args.config or run_config, [*earlier, *args.overrides]), "run"
    else:
        if args.config is None:
            raise ConfigError("train needs --config FILE (or --resume RUN_DIR)")
        cfg, config_name = config.load(args.config, args.overrides), args.config.stem
    # This command's process ends with its run. train() handles stop signals from set-up to the end of the run and
    # then puts back what it found: ignored, so that a late one (SLURM's batch shell resends its warning every 10 s)
    # cannot turn exit 0 or 75 into death by the signal while W&B and the process group shut down.
    ignore_stop_signals()
    train(cfg, config_name=config_name, resume=args.resume, overrides=args.overrides, force=args.force)


def _predict(args: argparse.Namespace) -> None:
    from .inference import predict

    results = predict(args.checkpoint, args.inputs, args.topk, weights=args.weights, hflip_tta=args.hflip_tta)
    if args.json:
        print(json.dumps(results, indent=1))
        return
    for r in results:
        if "error" in r:
            print(f"{r['path']}: skipped ({r['error']})")
        else:
            print(f"{r['path']}: " + ", ".join(f"{t['class']} {t['prob']:.3f}" for t in r["top"]))


def _eval(args: argparse.Namespace) -> None:
    from .inference import run_eval

    run_eval(
        args.checkpoint,
        args.data,
        args.batch_size,
        args.workers,
        args.device,
        args.json,
        args.loader,
        args.report,
        weights=args.weights,
        hflip_tta=args.hflip_tta,
    )


def _report(args: argparse.Namespace) -> None:
    if (args.run_dir is None) == (args.compare is None):
        raise ConfigError("report needs RUN_DIR or --compare SWEEP_DIR (one of the two)")
    if args.compare is not None:
        from .report import write_compare

        files, text = write_compare(args.compare)
        print(text, end="")
        print(f"wrote {', '.join(str(f) for f in files)}")
        return
    from .report import write_report

    files, text = write_report(args.run_dir)
    print(text, end="")
    print(f"wrote {len(files)} files to {args.run_dir / 'report'}")


def _sweep(args: argparse.Namespace) -> int:
    from .sweep import main as run_sweep

    return run_sweep(args)


def _bench(args: argparse.Namespace) -> None:
    from .bench import run

    run(args)


def _data(args: argparse.Namespace) -> int | None:
    if args.data_command == "check":
        from .data.check_cli import run as run_check

        return run_check(args)
    if args.data_command == "pack":
        from .data.pack import run as run_pack

        return run_pack(args)
    from .data.fetch import FetchError, fetch_flowers

    kwargs = {k: v for k, v in {"url": args.url, "sha256": args.sha256}.items() if v}
    try:
        fetch_flowers(
            args.dest, val_fraction=args.val_fraction, seed=args.seed, keep_archive=args.keep_archive, **kwargs
        )
    except FetchError as exc:
        raise DataError(str(exc)) from None
    return None


# Each command's runner; one that returns an int sets the exit code (data check's 0/1/2), None means 0.
_COMMANDS = {
    "train": _train,
    "sweep": _sweep,
    "eval": _eval,
    "predict": _predict,
    "report": _report,
    "bench": _bench,
    "data": _data,
}


def _error_exit(exc: Exception) -> int:
    """The exit code of an error the command ended with, after its one line on stderr."""
    if isinstance(exc, PreemptedError):
        print(f"flowers-dist: {exc}", file=sys.stderr)
        return EXIT_PREEMPTED
    code = EXIT_HUNG if isinstance(exc, HungError) else EXIT_DISK if isinstance(exc, DiskError) else EXIT_USER_ERROR
    # Under a launcher every process meets the same user error (data and config are checked alike on all ranks,
    # or decided on rank 0 and shared): one line from rank 0, the same exit code from all.
    if code != EXIT_USER_ERROR or int(os.environ.get("RANK", "0")) == 0:
        print(f"flowers-dist: error: {exc}", file=sys.stderr)
    if code == EXIT_USER_ERROR and int(os.environ.get("RANK", "0")) == 0 and os.environ.get("FLOWERS_DIST_ERROR_FILE"):
        # launch/*.sh print it again after the launcher's traceback, as the last line.
        Path(os.environ["FLOWERS_DIST_ERROR_FILE"]).write_text(f"flowers-dist: error: {exc}\n")
    return code


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # argparse gives the bench positionals (mode, overrides) out in one piece; overrides after options come back here.
    if extra and (args.command != "bench" or any(e.startswith("-") or "=" not in e for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides += extra
    try:
        return _COMMANDS[args.command](args) or 0
    except (PreemptedError, HungError, DiskError, *USER_ERRORS) as exc:
        return _error_exit(exc)


if __name__ == "__main__":
    sys.exit(main())
