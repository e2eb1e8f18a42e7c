"""Use a trained checkpoint: exact evaluation on a labelled folder, and top-k predictions on images."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from accelerate.utils import broadcast_object_list

from . import artifacts, checkpoint_file, mistakes
from .config import Config, TrackingConfig, from_dict
from .data import Placement, Split, build_loader, scan_split, shards
from .data.contract import DeviceNormalizer
from .data.folder import IMAGE_SUFFIXES, DataError, resolve_eval_dir
from .data.torch_loader import eval_transform, load_rgb
from .data.usable import shared, usable_split
from .distributed import make_accelerator, num_nodes, placement
from .environment import environment
from .errors import CheckpointError, ConfigError
from .evaluate import EvalResult, FlipAveraged, local_counts
from .model import build_model
from .sinks import SinkContext, for_run
from .tracking import resolve_mode

WEIGHTS = ("model", "ema")
HFLIP_TTA = ("auto", "on", "off")


def load_trained(path: str | Path, device: torch.device, weights: str = "model"):
    """Model with the checkpoint's weights, its config and class list; `path` may name a W&B artifact (artifacts.resolve).

    `weights`: "model" (the trained weights) or "ema" (model.ema's weight average, saved beside them).
    """
    state = checkpoint_file.load(artifacts.resolve(path))
    cfg = from_dict(state["config"])
    cfg.model.pretrained = "none"  # the checkpoint brings every weight
    model = build_model(cfg.model, len(state["classes"]))
    model.load_state_dict(chosen_weights(state, weights, path))
    return model.to(device).eval(), cfg, list(state["classes"])


def chosen_weights(state: dict, weights: str, path: str | Path) -> dict:
    """The state dict that `weights` names in a checkpoint."""
    if weights not in WEIGHTS:
        raise ConfigError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    if weights == "ema" and state.get("ema") is None:  # saved with model.ema=0 (None), or before model.ema (missing)
        raise CheckpointError(f"{path} holds no weight average: its run had model.ema=0; use --weights model")
    return state[weights]


def uses_hflip_tta(choice: str, cfg: Config) -> bool:
    """--hflip-tta: on, off, or auto = as the run evaluated (its train.eval_hflip_tta), so eval reproduces val_acc."""
    if choice not in HFLIP_TTA:
        raise ConfigError(f"hflip_tta must be one of {', '.join(HFLIP_TTA)}, got {choice!r}")
    return cfg.train.eval_hflip_tta if choice == "auto" else choice == "on"


def run_eval(
    checkpoint_path: str | Path,
    data_dir: str | Path,
    batch_size: int,
    workers: int,
    device: str,
    json_path: str | None,
    loader: str = "auto",
    report_dir: str | Path | None = None,
    weights: str = "model",
    hflip_tta: str = "auto",
) -> EvalResult:
    """Every process counts its shard; counts are summed once, so each image counts exactly once.

    Files that do not decode are left out (and named) by the data check, whichever the loader.
    `data_dir` may be a packed data set (`data pack`): its val split is read from the shards.
    `report_dir`: also write the val images the model gets wrong there, and log them to W&B (eval_report).
    `weights` ("model" or "ema") and `hflip_tta` ("auto": the run's train.eval_hflip_tta, "on", "off"): what is
    scored, here and in the report; with the defaults the result is the run's val_acc (val_acc_ema with "ema").
    """
    accelerator = make_accelerator(device, "no", log_with="wandb" if report_dir is not None else None)
    model, cfg, classes = load_trained(checkpoint_file_of(checkpoint_path, accelerator), accelerator.device, weights)
    flip = uses_hflip_tta(hflip_tta, cfg)
    cfg.data.loader = loader
    split = eval_split(data_dir, classes)
    split, skipped = shared(lambda: usable_split(cfg.data, split), accelerator.is_main_process, broadcast_object_list)
    if accelerator.is_main_process and skipped.count:
        print(skipped.line().replace("data check:", "eval:") + "; skipped files:")
        for path, kind, detail in skipped.files:
            print(f"  {path}: {kind}: {detail}")
    place = placement(accelerator, channels_last=cfg.model.channels_last, workers=workers)
    loader = build_loader(cfg.data, split, train=False, batch_size=batch_size, placement=place, seed=0)
    counts = local_counts(model, loader, len(classes), accelerator.device, hflip_tta=flip)
    result = EvalResult.from_counts(accelerator.reduce(counts, reduction="sum"), len(classes))
    if accelerator.is_main_process:
        tta = "flip TTA on" if flip else "flip TTA off"
        print(f"{checkpoint_path} ({weights} weights, {tta}) on {split.root} ({accelerator.num_processes} process(es))")
        print(result.format(classes))
        if json_path:
            Path(json_path).write_text(
                json.dumps(
                    {
                        **result.to_dict(classes),
                        "weights": weights,
                        "hflip_tta": flip,
                        "world_size": accelerator.num_processes,
                        "skipped": skipped.record()["skipped_files"],
                    },
                    indent=1,
                )
                + "\n"
            )
        if report_dir is not None:
            scored = FlipAveraged(model) if flip else model
            eval_report(Path(report_dir), scored, split, cfg, place, batch_size, accelerator)
    return result


def checkpoint_file_of(checkpoint: str | Path, accelerator) -> Path:
    """The file a checkpoint argument names; a W&B artifact is fetched by the main process first, so that the others
    find it in W&B's cache on the same node. Every rank raises the main process's error, none waits for it."""
    if not artifacts.is_artifact_name(str(checkpoint)):
        return Path(checkpoint)

    def attempt() -> Path | Exception:
        try:
            return artifacts.resolve(checkpoint)
        except CheckpointError as exc:
            return exc

    found = attempt() if accelerator.is_main_process else None
    accelerator.wait_for_everyone()
    if found is None:
        found = attempt()
    if isinstance(found, Exception):
        raise found
    if accelerator.is_main_process:
        print(f"W&B artifact {checkpoint}: {found}")
    return found


def eval_report(
    out: Path, model: torch.nn.Module, split: Split, cfg: Config, place: Placement, batch_size: int, accelerator
) -> None:
    """Main process: out/mistakes.html and mistakes.png, and, with tracking on (the checkpoint's tracking.wandb, or
    WANDB_MODE), the `val/mistakes` table in a W&B run of its own (job_type `eval`, files under `out`)."""
    limit = cfg.tracking.mistakes or TrackingConfig.mistakes  # asked for on the command line, so never off
    media = mistakes.of_model(model, split, cfg.data, place, batch_size=batch_size, out=out, limit=limit)
    # Each eval is a W&B run of its own: a kept id would resume the last one, whose step 0 W&B has seen (and drops).
    (out / "wandb_run_id").unlink(missing_ok=True)
    tracking_cfg = dataclasses.replace(cfg.tracking, job_type="eval")  # tracking.job_type: W&B tells evals apart
    context = SinkContext(out, accelerator, tracking_cfg, resolve_mode(tracking_cfg))
    env = environment(accelerator.num_processes, num_nodes(accelerator), accelerator.device)
    for sink in for_run(context):
        sink.start(cfg, list(split.classes), env)
        sink.log_media(0, media)
        sink.finish(None)
    accelerator.end_training()  # closes the W&B run
    for line in media.notes:
        print(line)


def eval_split(data_dir: str | Path, classes: list[str]) -> Split:
    """The labelled split to evaluate: a pack's val split, a data set's val/, or a folder of class folders."""
    if shards.is_packed(data_dir):
        split = shards.split(shards.load(data_dir), "val")
        if list(split.classes) != list(classes):
            raise DataError(f"the classes packed in {data_dir} differ from those the checkpoint was trained on")
        return split
    return scan_split(resolve_eval_dir(data_dir), classes)


def image_paths(inputs: list[str]) -> list[Path]:
    paths: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            paths += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            paths.append(p)
        else:
            raise DataError(f"{p} is neither an image nor a folder")
    if not paths:
        raise DataError(f"no images found in {', '.join(inputs)}")
    return paths


@torch.no_grad()
def predict(
    checkpoint_path: str | Path,
    inputs: list[str],
    topk: int,
    batch_size: int = 32,
    weights: str = "model",
    hflip_tta: str = "auto",
) -> list[dict]:
    """Top-k classes of each image, in input order; `weights` and `hflip_tta` as for run_eval (the flip averages the
    logits of the image and its mirror image before the softmax)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, cfg, classes = load_trained(checkpoint_path, device, weights)
    if uses_hflip_tta(hflip_tta, cfg):
        model = FlipAveraged(model)
    transform = eval_transform(cfg.data)
    normalize = DeviceNormalizer(
        cfg.data.mean, cfg.data.std, Placement(0, 1, device, channels_last=cfg.model.channels_last)
    )
    k = min(topk, len(classes))
    results = []
    paths = image_paths(inputs)
    for start in range(0, len(paths), batch_size):
        # One result per file, in input order; a file that does not load is said once, by its result (no log line too).
        rows: list[dict] = []
        batch, kept = [], []
        for path in paths[start : start + batch_size]:
            rows.append({"path": str(path)})
            try:
                batch.append(transform(load_rgb(path, cfg.data.max_pixels)))
                kept.append(rows[-1])
            except (OSError, ValueError, SyntaxError) as exc:
                rows[-1]["error"] = str(exc).replace(f" {str(path)!r}", "")  # PIL repeats the path the row names
        if batch:
            images, _ = normalize(torch.stack(batch), torch.zeros(len(batch), dtype=torch.int64))
            top = model(images).float().softmax(1).topk(k, dim=1)
            for row, p, i in zip(kept, top.values.tolist(), top.indices.tolist()):
                row["top"] = [{"class": classes[c], "prob": q} for c, q in zip(i, p)]
        results += rows
    return results
