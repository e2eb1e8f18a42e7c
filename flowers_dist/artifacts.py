"""Checkpoints as W&B artifacts: what a landed checkpoint is called, its aliases and metadata, and an artifact name back to a file.

`tracking.artifacts` chooses what goes to W&B: `best` uploads best.pt at each new best epoch as a
version of the `model` artifact `model-<W&B run id>`; `all` also logs every step file as a
`checkpoint` artifact `checkpoints-<W&B run id>` that only references it (a file:// URI: nothing is
uploaded, the file stays where it is). The W&B sink (sinks.py) logs them when the background
writer has put the file on disk, so a run stopped later has its best checkpoint in W&B already.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checkpoint_file import header_digest
from .config import TrackingConfig
from .errors import CheckpointError

MODEL_TYPE = "model"
"""The W&B type of the uploaded best checkpoints (W&B's model registry links artifacts of this type)."""
CHECKPOINT_TYPE = "checkpoint"
"""The W&B type of the step checkpoints logged by reference."""

# [entity/][project/]name:alias, in W&B's characters; a path that exists is always a path.
ARTIFACT_NAME = re.compile(r"^(?:[\w.-]+/){0,2}[\w.-]+:[\w.-]+$")


@dataclass(frozen=True)
class Landed:
    """A checkpoint the background writer has put on disk, and what its state says about it."""

    step_file: Path
    """`step-<global step>.pt`, the file every name of this save links to."""
    best_file: Path | None
    """`best.pt` when this save ended a best epoch, else None."""
    global_step: int
    epochs_done: int
    """Completed epochs (the console's count): the checkpoint's `epoch` + 1."""
    epoch_end: bool
    """Saved at an epoch's end (not mid-epoch: a stop or a periodic save)."""
    best_val_acc: float | None
    """The best val accuracy so far; None before the first epoch's evaluation."""
    best_epoch: int | None
    """The best epoch so far, counted from 1; None before the first."""
    classes: tuple[str, ...]
    config: dict[str, Any]

    @property
    def sha256(self) -> str:
        """The SHA-256 the step file's header carries over its payload (checkpoint_file verifies it on load): read
        only when an artifact is built, not for every save of a run that logs none."""
        return header_digest(self.step_file)

    @classmethod
    def of(cls, paths: list[Path], facts: dict[str, Any]) -> Landed:
        """From the paths a save wrote (the step file first) and its state's small fields (CheckpointManager.save)."""
        best = next((p for p in paths if p.name == "best.pt"), None)
        return cls(
            step_file=paths[0],
            best_file=best,
            global_step=int(paths[0].stem.split("-")[1]),
            epochs_done=facts["epoch"] + 1,
            epoch_end=facts["position"]["step"] == 0,
            best_val_acc=facts["best"]["val_acc"] if facts["best"]["epoch"] >= 0 else None,
            best_epoch=facts["best"]["epoch"] + 1 if facts["best"]["epoch"] >= 0 else None,
            classes=tuple(facts["classes"]),
            config=facts["config"],
        )


def aliases(landed: Landed, uploaded: bool) -> list[str]:
    """`latest` and `step-S`, `epoch-N` at an epoch's end; `best` on the uploaded best.pt.

    W&B keeps an alias on one version of an artifact, so `best` and `latest` move to the newest."""
    names = ["latest", f"step-{landed.global_step}"]
    if landed.epoch_end:
        names.append(f"epoch-{landed.epochs_done}")
    if uploaded:
        names.insert(0, "best")
    return names


def metadata(landed: Landed, git_commit: str | None) -> dict[str, Any]:
    """What a version says about its checkpoint; `val_acc` only on a best checkpoint, the one whose accuracy is known."""
    return {
        **({"val_acc": landed.best_val_acc} if landed.best_file is not None else {}),
        "epoch": landed.epochs_done,
        "step": landed.global_step,
        "best_val_acc": landed.best_val_acc,
        "best_epoch": landed.best_epoch,
        "classes": list(landed.classes),
        "config": landed.config,
        "git_commit": git_commit,
        "sha256": landed.sha256,
    }


def to_log(landed: Landed, setting: str) -> list[tuple[str, bool]]:
    """(artifact type, uploaded) for each artifact `tracking.artifacts` logs for this checkpoint."""
    logs = []
    if setting in ("best", "all") and landed.best_file is not None:
        logs.append((MODEL_TYPE, True))
    if setting == "all":
        logs.append((CHECKPOINT_TYPE, False))
    return logs


def build(landed: Landed, kind: str, run_id: str, git_commit: str | None):
    """The wandb.Artifact of one landed checkpoint: best.pt uploaded (kind `model`) or the step file by reference."""
    import wandb

    name = f"{'model' if kind == MODEL_TYPE else 'checkpoints'}-{run_id}"
    artifact = wandb.Artifact(name, type=kind, metadata=metadata(landed, git_commit))
    if kind == MODEL_TYPE:
        # `mutable`: W&B uploads a copy it stages, since the next best epoch replaces best.pt; skip_cache: no third
        # copy in W&B's cache after the upload.
        artifact.add_file(str(landed.best_file), name="best.pt", policy="mutable", skip_cache=True)
    else:
        artifact.add_reference(landed.step_file.resolve().as_uri(), name=landed.step_file.name, checksum=True)
    return artifact


# -- an artifact name back to a file (eval, predict) ---------------------------------------------
def is_artifact_name(text: str) -> bool:
    """Whether a checkpoint argument names a W&B artifact: not an existing path, and shaped [entity/][project/]name:alias."""
    return not Path(text).exists() and ARTIFACT_NAME.match(text) is not None


def qualified(name: str) -> str:
    """`name:alias` gets the project (WANDB_PROJECT, else tracking.project's default); an entity stays W&B's default."""
    if "/" in name:
        return name
    return f"{os.environ.get('WANDB_PROJECT') or TrackingConfig.project}/{name}"


def resolve(checkpoint: str | Path) -> Path:
    """The checkpoint file an eval or predict argument names: a path as it is, an artifact name through W&B.

    W&B fetches the artifact's manifest from its server, then takes the file from its cache (WANDB_CACHE_DIR)
    when it holds the digest, else downloads (or, for a reference, copies) it there; the file is then linked or
    copied under WANDB_ARTIFACT_DIR (default ./artifacts). Any failure is one line naming the artifact.
    """
    text = str(checkpoint)
    if not is_artifact_name(text):
        return Path(checkpoint)
    name = qualified(text)
    try:
        import wandb

        artifact = wandb.Api().artifact(name)
        files = [entry for entry in artifact.manifest.entries if entry.endswith(".pt")]
        if len(files) != 1:
            raise CheckpointError(f"W&B artifact {name} holds {len(files)} .pt files, not one checkpoint")
        return Path(artifact.get_entry(files[0]).download())
    except CheckpointError:
        raise
    except Exception as exc:  # W&B raises many kinds (no key, no network, no such artifact): each is the user's to fix
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
        raise CheckpointError(
            f"cannot fetch W&B artifact {name}: {type(exc).__name__}{': ' + first[:200] if first else ''}"
        ) from None
