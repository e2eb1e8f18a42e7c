"""Which config changes `--resume` accepts: those that cannot change what the run computes.

A resumed run is meant to end as the uninterrupted run would have. Changing the model, the data
pipeline, the optimizer or the batch on resume would silently make the run folder describe a
run that never happened (and a new model.name fails deep inside load_state_dict), so such a
change stops the resume with one line naming the key, unless the user insists with `--force`.
Every resume's overrides and the keys it changed are kept in `resumes.jsonl` beside the original
config.yaml, which is never rewritten.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from .config import Config
from .errors import ConfigError

# Keys that leave the weights alone: where things go and how they are shown, evaluation's batching
# (its counts are exact at any batch), the decode workers and decoder share, the data folder's path
# and where it is staged (the classes are checked against the checkpoint's), memory layout and torch.compile (the same
# function, computed another way), the initial weights (the checkpoint's replace them), and when
# checkpoints are written and failures detected.
HARMLESS = {
    "data.root",
    "data.stage_to",
    "data.num_workers",
    "data.hw_decoder_load",
    "model.compile",
    "model.channels_last",
    "model.pretrained",
    "train.eval_batch_size",
    "train.log_every",
    "train.output_dir",
    "train.name",
    "train.progress",
    "train.resume",
    "train.checkpoint_every_steps",
    "train.checkpoint_every_minutes",
    "train.keep_checkpoints",
    "train.record_samples",
    "train.stop_check_every",
    "train.collective_timeout",
    "train.watchdog",
    "tracking.wandb",
    "tracking.project",
    "tracking.entity",
    "tracking.tags",
    "tracking.group",
    "tracking.job_type",
    "tracking.target_accuracy",
    "tracking.mistakes",
    "tracking.artifacts",
}


def _flat(cfg: dict[str, Any]) -> dict[str, Any]:
    return {f"{section}.{key}": value for section, values in cfg.items() for key, value in values.items()}


def changes(saved: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The dotted keys whose value differs between the run's config and the resume's, with (old, new).

    Keys the saved config lacks (a checkpoint from before they existed) count as their defaults.
    """
    old, now = {**_flat(Config().to_dict()), **_flat(saved)}, _flat(new)
    return {key: (old.get(key), now.get(key)) for key in now if old.get(key) != now.get(key)}


def changes_result(key: str, saved: dict[str, Any]) -> bool:
    """Whether changing `key` on resume changes what the run computes.

    train.epochs only extends (or ends early) the step schedule's run; under cosine the rate of
    every step depends on the total (onecycle's too), so there it changes the result too.
    """
    if key == "train.epochs":
        return saved.get("optim", {}).get("schedule") in ("cosine", "onecycle")
    return key not in HARMLESS


def check(saved: dict[str, Any], new: dict[str, Any], force: bool) -> dict[str, tuple[Any, Any]]:
    """The resume's changes; a ConfigError naming the first one that changes the result, unless `force`."""
    found = changes(saved, new)
    if not force:
        for key, (old, now) in found.items():
            if changes_result(key, saved):
                raise ConfigError(
                    f"config key '{key}' changes what the resumed run computes ({old!r} -> {now!r}); "
                    "start a new run, or pass --force to resume with it anyway"
                )
    return found


def previous_overrides(run_dir: Path) -> list[str]:
    """Every earlier resume's overrides, in order: with config.yaml, they give the config the run last ran with."""
    path = run_dir / "resumes.jsonl"
    if not path.is_file():
        return []
    return [item for line in path.read_text().splitlines() if line.strip() for item in json.loads(line)["overrides"]]


def record(
    run_dir: Path,
    overrides: list[str],
    found: dict[str, tuple[Any, Any]],
    forced: bool,
    from_epoch: int,
    world_size: int,
) -> None:
    """Append this resume (overrides as given, changed keys, whether forced) to run_dir/resumes.jsonl."""
    line = {
        "time": round(time.time(), 3),
        "from_epoch": from_epoch,
        "world_size": world_size,
        "overrides": list(overrides),
        "changed": {key: list(pair) for key, pair in found.items()},
        "forced": forced,
    }
    with open(run_dir / "resumes.jsonl", "a") as fh:
        fh.write(json.dumps(line) + "\n")
