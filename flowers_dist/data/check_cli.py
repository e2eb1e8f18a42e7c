"""`flowers-dist data check`: the arguments, and the run that prints the report and picks the exit code."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import DataConfig


def add_arguments(check: argparse.ArgumentParser) -> None:
    check.add_argument(
        "root",
        type=Path,
        nargs="?",
        help="data-set root holding train/ and val/, one folder of class folders, or a packed data set (`data pack`)",
    )
    check.add_argument(
        "--quarantine",
        type=Path,
        metavar="DIR",
        help="move every file training would skip into DIR (never deleted), with DIR/manifest.json",
    )
    check.add_argument("--restore", type=Path, metavar="MANIFEST", help="put the files of a quarantine manifest back")
    check.add_argument("--json", type=Path, metavar="FILE", help="also write the full report as JSON")
    check.add_argument(
        "--config", type=Path, help="YAML config whose data section sets the limits (data.max_pixels, data.min_side)"
    )
    check.add_argument(
        "--decode",
        action="store_true",
        help="a packed data set: also decode every sample (a folder's files are always decoded)",
    )
    check.add_argument("--workers", type=int, default=-1, help="probe processes (-1 = every core)")
    check.add_argument(
        "--progress",
        choices=["auto", "bar", "none"],
        default="auto",
        help="progress bar on stderr: auto = only on a terminal",
    )


def run(args: argparse.Namespace) -> int:
    """0 clean, 1 only problems training skips, 2 problems that stop training (or a usage error); a pack: 0 or 2."""
    from ..config import ConfigError, load
    from . import default_workers, shards
    from .check import check_dataset
    from .quarantine import quarantine, restore

    if args.restore is not None:
        restored, problems = restore(args.restore)
        for p in problems:
            print(f"not restored: {p}", file=sys.stderr)
        print(f"restored {restored} file(s) from {args.restore}")
        return 2 if problems else 0
    if args.root is None:
        raise ConfigError("data check needs ROOT (or --restore MANIFEST)")
    cfg = load(args.config).data
    progress = args.progress == "bar" or (args.progress == "auto" and sys.stderr.isatty())
    workers = default_workers(1) if args.workers < 0 else max(1, args.workers)
    if shards.is_packed(args.root):
        return _run_on_pack(args, cfg, workers, progress)
    report = check_dataset(args.root, cfg, workers=workers, progress=progress)
    print(report.format(), end="")
    if args.json:
        args.json.write_text(json.dumps(report.to_dict(), indent=1) + "\n")
    code = report.exit_code
    if args.quarantine is not None and report.skipped():
        manifest = quarantine(report, args.quarantine)
        print(
            f"moved {len(report.skipped())} file(s) to {args.quarantine}; put them back with "
            f"`flowers-dist data check --restore {manifest}`"
        )
        code = 2 if report.fatal else 0  # what is left in the data set: the skipped files are gone from it
    return code


def _run_on_pack(args: argparse.Namespace, cfg: DataConfig, workers: int, progress: bool) -> int:
    """A packed data set: every file against its manifest (pack_check); 0 clean, 2 anything bad."""
    from ..config import ConfigError
    from .pack_check import check_pack

    if args.quarantine is not None:
        raise ConfigError("data check --quarantine moves files of a folder, not samples of a pack: pack again instead")
    report = check_pack(args.root, cfg, decode=args.decode, workers=workers, progress=progress)
    print(report.format(), end="")
    if args.json:
        args.json.write_text(json.dumps(report.to_dict(), indent=1) + "\n")
    return report.exit_code
