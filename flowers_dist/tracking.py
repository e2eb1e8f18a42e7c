"""W&B settings for a run: which mode to use, the init arguments, and the values W&B renders."""

from __future__ import annotations

import netrc
import os
import secrets
import string
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from .config import Config, TrackingConfig
from .errors import ConfigError


def has_credentials() -> bool:
    """An API key in the environment, or a netrc entry for the W&B host (what `wandb login` writes)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


# The values W&B's settings accept for WANDB_MODE, and the mode each means here.
_WANDB_MODES = {
    "online": "online",
    "run": "online",
    "shared": "online",
    "offline": "offline",
    "dryrun": "offline",
    "disabled": "disabled",
}


def resolve_mode(cfg: TrackingConfig) -> str:
    """online, offline or disabled. A set WANDB_MODE decides `auto` (tests set it to disabled).

    W&B validates WANDB_MODE whenever it starts, even when it is given a mode, so a value it rejects (an empty
    `WANDB_MODE=` included) is a one-line error here rather than a pydantic traceback after the run has begun.
    """
    env = os.environ.get("WANDB_MODE")
    if env is not None and env not in _WANDB_MODES and cfg.wandb != "disabled":
        raise ConfigError(
            f"WANDB_MODE={env!r} is not a W&B mode: unset it, or set it to one of {', '.join(_WANDB_MODES)}"
        )
    if cfg.wandb != "auto":
        return cfg.wandb
    if env is not None:
        return _WANDB_MODES[env]
    return "online" if has_credentials() else "offline"


def run_id(run_dir: Path) -> str:
    """The W&B run id of this run folder, made once and kept, so that `--resume` continues the same W&B run."""
    path = run_dir / "wandb_run_id"
    if path.is_file():
        return path.read_text().strip()
    new_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))  # W&B's id alphabet
    path.write_text(new_id + "\n")
    return new_id


def init_kwargs(cfg: TrackingConfig, mode: str, run_dir: Path) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "mode": mode,
        "dir": str(run_dir),
        "name": run_dir.name,
        "tags": list(cfg.tags),
        "id": run_id(run_dir),
        "resume": "allow",
    }
    if cfg.group:
        kwargs["group"] = cfg.group
    if cfg.job_type:
        kwargs["job_type"] = cfg.job_type
    if cfg.entity:
        kwargs["entity"] = cfg.entity
    return {"wandb": kwargs}


def step_offset(records: list[dict[str, Any]], resume_step: int) -> int:
    """How far past the optimizer step a resumed run logs to W&B, so that no row lands at or below one already logged.

    W&B drops rows whose step is not above the highest it has seen; a run killed mid-epoch has
    logged steps past its checkpoint (resume_step), which the resumed run trains, and logs, again.
    `records` is metrics.jsonl so far; rows logged under an earlier offset carry their `wandb_step`.
    """
    logged = [r.get("wandb_step", r["step"]) for r in records if r.get("event") in ("step", "epoch")]
    return max(0, max(logged, default=0) - resume_step)


def run_config(cfg: Config, env: dict[str, Any], classes: list[str]) -> dict[str, Any]:
    """What W&B records once: the resolved config, code and library versions, hardware."""
    return {**cfg.to_dict(), "environment": env, "classes": classes}


def step_values(record: dict[str, Any]) -> dict[str, Any]:
    """The W&B keys of one `step` record of metrics.jsonl."""
    return {
        "epoch": record["epoch"],
        "train/loss": record["loss"],
        "train/lr": record["lr"],
        "perf/images_per_s": record["images_per_s"],
        "perf/images_per_s_per_process": record["images_per_s_per_process"],
        "perf/step_time": record["step_time"],
        "perf/data_wait_fraction": record["data_wait_fraction"],
    }


def epoch_values(record: dict[str, Any], classes: list[str]) -> dict[str, Any]:
    """The W&B keys of one `epoch` record, with the confusion matrix as a W&B chart."""
    import wandb

    values = {
        "epoch": record["epoch"],
        "train/epoch_loss": record["train_loss"],
        "train/accuracy": record["train_acc"],
        "val/loss": record["val_loss"],
        "val/accuracy": record["val_acc"],
        "perf/epoch_time": record["epoch_time"],
        "perf/epoch_images_per_s": record["images_per_s"],
        **{f"val/accuracy_{name}": acc for name, acc in record["val_per_class"].items()},
        # model.ema: the averaged weights' evaluation, beside the trained weights'
        **(
            {"val/accuracy_ema": record["val_acc_ema"], "val/loss_ema": record["val_loss_ema"]}
            if "val_acc_ema" in record
            else {}
        ),
    }
    # wandb.plot.confusion_matrix wants one (true, predicted) pair per sample; expand the counts.
    y_true, preds = [], []
    for i, row in enumerate(record["val_confusion"]):
        for j, n in enumerate(row):
            y_true += [i] * n
            preds += [j] * n
    if y_true:
        values["val/confusion"] = wandb.plot.confusion_matrix(
            y_true=y_true, preds=preds, class_names=classes, title=f"val confusion, epoch {record['epoch']}"
        )
    return values
