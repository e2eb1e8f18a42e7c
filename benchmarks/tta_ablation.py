"""The time-to-accuracy ablation (issue 19): the seed's recipe from scratch, then the fast proxy's levers added one group
at a time, every row trained by one `bench tta` on the same data and machine.

    python benchmarks/tta_ablation.py [--data ../shared/flowers] [--target 0.7] [--seed-epochs 10] [--repeats 1]

Row 0 is configs/flowers_resnet18.yaml as a new user would try it from scratch (SCRATCH: 128 px, no ImageNet weights,
timm's zero-initialised last BatchNorm off) for --seed-epochs epochs: StepLR does not look at the run's length, so
10 epochs are the first 10 of the recipe's 25, enough to pass 70 %. Each later row takes the previous row's config
and sets one group of keys (GROUPS) to configs/flowers_resnet18_fast_scratch.yaml's values, at the fast proxy's
epoch budget; the last row is that config, key for key (`rows` refuses a group list that would miss a difference).
Prints the markdown table (README's ablation) with each row's time to target against the seed's, and writes
bench tta's JSON and plot (default benchmarks/results/tta-ablation-<host>.json).
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from flowers_dist import config as config_module  # noqa: E402

SEED = REPO / "configs" / "flowers_resnet18.yaml"
FAST = REPO / "configs" / "flowers_resnet18_fast_scratch.yaml"
SCRATCH = ["data.image_size=128", "model.pretrained=none", "model.zero_init_last=false"]
"""The seed's recipe from scratch, as the issue's baseline: 128 px, no ImageNet weights, zero_init_last off."""

GROUPS: list[tuple[str, str, list[str]]] = [
    ("bf16", "bf16 autocast, channels_last", ["train.mixed_precision", "model.channels_last"]),
    (
        "onecycle",
        "one-cycle rate (peak lr, Nesterov)",
        ["optim.schedule", "optim.lr", "optim.nesterov", "optim.onecycle_pct_start"],
    ),
    ("smoothing", "label smoothing", ["optim.label_smoothing"]),
    ("decay", "weight decay, none on norms and biases", ["optim.weight_decay", "optim.no_decay_norm_bias"]),
    ("crops", "milder random crops (area 0.25-1)", ["data.scale"]),
    (
        "progressive",
        "progressive resizing",
        ["data.progressive_min_size", "data.progressive_start_epoch", "data.progressive_end_epoch"],
    ),
]
"""The lever groups in the order they are added: a short name (the config's label in bench tta), what it is, and the
dotted keys it takes from the fast proxy's config."""


def _text(value: Any) -> str:
    """A value as a dotted override writes it: lists as YAML flow sequences, booleans as true/false."""
    if isinstance(value, (list, tuple)):
        return json.dumps(list(value))
    return str(value).lower() if isinstance(value, bool) else str(value)


def rows(seed_epochs: int, groups: list[tuple[str, str, list[str]]] = GROUPS) -> list[tuple[str, str, list[str]]]:
    """(name, label, overrides of the seed config) per row: the seed from scratch, then one more group of levers a row.

    Refuses groups that leave a key in which the fast proxy's config differs unset (or name a key no config has),
    so that the table's last row is the committed recipe.
    """
    seed = config_module.dotted(config_module.load(SEED, SCRATCH))
    fast = config_module.dotted(config_module.load(FAST))
    budget = [f"train.epochs={fast['train.epochs']}"]
    grouped = [key for _, _, keys in groups for key in keys]
    differs = {key for key in fast if key not in ("train.epochs", "data.root") and fast[key] != seed[key]}
    missing, unknown = differs - set(grouped), set(grouped) - set(fast)
    if missing or unknown:
        raise ValueError(f"the lever groups miss {sorted(missing)} and name keys no config has: {sorted(unknown)}")
    out = [("seed", "the seed's recipe, from scratch", [*SCRATCH, f"train.epochs={seed_epochs}"])]
    overrides = [*SCRATCH, *budget]
    for name, label, keys in groups:
        overrides = overrides + [f"{key}={_text(fast[key])}" for key in keys]
        out.append((name, f"+ {label}", overrides))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "flowers"))
    parser.add_argument("--target", type=float, default=0.7)
    parser.add_argument("--seed-epochs", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument(
        "--out", type=Path, default=REPO / "benchmarks" / "results" / f"tta-ablation-{socket.gethostname()}.json"
    )
    args = parser.parse_args()
    table = rows(args.seed_epochs)
    with tempfile.TemporaryDirectory(prefix="tta-ablation-") as tmp:
        paths = []
        for i, (name, _, overrides) in enumerate(table):
            path = Path(tmp) / f"{i}-{name}.yaml"
            config_module.dump(config_module.load(SEED, overrides), path)
            paths.append(path)
        command = ["flowers-dist", "bench", "tta", *[a for p in paths for a in ("--config", str(p))]]
        command += ["--target", str(args.target), "--repeats", str(args.repeats), "--out", str(args.out)]
        subprocess.run([*command, f"data.root={args.data}"], check=True)
    print(markdown(json.loads(args.out.read_text()), [label for _, label, _ in table]))


def markdown(result: dict[str, Any], labels: list[str]) -> str:
    """The README's ablation table: per row its time to the target, against the seed's, and its best val accuracy."""
    summary = result["results"]["summary"]
    seed_time = summary[0]["time_to_target_s"]
    cpu = result["environment"]["cpu"]
    lines = [
        f"{cpu['model_name']}, avx512_bf16 {cpu['avx512_bf16']}, amx_bf16 {cpu['amx_bf16']}; "
        f"target {summary[0]['target']:.2f} val accuracy, {result['results']['repeats']} run(s) each",
        "",
        "| row | epochs | time to target | vs the seed | best val acc |",
        "|---|---|---|---|---|",
    ]
    for label, row in zip(labels, summary):
        t = row["time_to_target_s"]
        ratio = "-" if t is None or seed_time is None else f"{t / seed_time:.2f}x"
        shown = "not reached" if t is None else f"{t:.0f} s (epoch {row['epoch_to_target'] + 1:g})"
        lines.append(f"| {label} | {row['epochs']} | {shown} | {ratio} | {row['best_val_acc']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
