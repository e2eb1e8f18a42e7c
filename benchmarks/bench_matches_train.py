"""`bench train` against `train` itself: the images/s each reports for the same config, with and without accumulation.

`bench train` sets the run up through parts.py and times steps.optimizer_step, the function the
training loop calls; this checks that the figure it prints is the loop's own. For each
accumulation it runs, one after the other in this process's machine state, `bench train` and
one epoch of `train` (W&B off), and compares bench's median optimizer-step rate with the median
of train's `step` rows (the first log window, warm-up, left out). Prints the processor, since
figures move with it.

    python benchmarks/bench_matches_train.py [--config configs/quickstart.yaml] [--accum 1 2] [--steps 20] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from flowers_dist import metrics_log  # noqa: E402


def cpu_model() -> str:
    """/proc/cpuinfo's model name and the bf16 flags that decide how fast bf16 runs here."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown processor"
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    bf16 = [f for f in ("amx_bf16", "avx512_bf16") if f in flags]
    return f"{model} ({', '.join(bf16) if bf16 else 'no AMX / AVX-512 BF16'})"


def run(args: list[str]) -> None:
    env = {**os.environ, "WANDB_MODE": "disabled"}
    proc = subprocess.run(
        [sys.executable, "-m", "flowers_dist", *args], cwd=REPO, env=env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise SystemExit(f"flowers-dist {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-2000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--accum", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=20, help="bench train's timed optimizer steps")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for accum in args.accum:
            common = ["--config", args.config, *args.overrides, f"train.grad_accum_steps={accum}"]
            out = Path(tmp) / f"bench-{accum}.json"
            run(["bench", "train", *common, "--warmup", "3", "--steps", str(args.steps), "--out", str(out)])
            bench = json.loads(out.read_text())["results"]
            run(
                [
                    "train",
                    *common,
                    "train.epochs=1",
                    "train.log_every=5",
                    "train.progress=lines",
                    f"train.output_dir={tmp}",
                    f"train.name=train-{accum}",
                ]
            )
            steps = metrics_log.events(metrics_log.read(metrics_log.path_of(Path(tmp) / f"train-{accum}")), "step")
            train_rate = statistics.median(r["images_per_s"] for r in steps[1:])
            rows.append((accum, bench["micro_batch_size"], bench["loader"], bench["images_per_s"], train_rate))
    print(f"processor: {cpu_model()}; config {args.config} {' '.join(args.overrides)}")
    print("| accumulation | micro-batch | loader | bench train img/s | train img/s | bench / train |")
    print("|---|---|---|---|---|---|")
    for accum, micro, loader, bench_rate, train_rate in rows:
        print(f"| {accum} | {micro} | {loader} | {bench_rate:.1f} | {train_rate:.1f} | {bench_rate / train_rate:.2f} |")


if __name__ == "__main__":
    main()
