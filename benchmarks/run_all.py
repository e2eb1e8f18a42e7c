"""The performance figures of docs/benchmarks.md: runs every `flowers-dist bench` mode and prints the Markdown tables.

Each command writes its JSON (machine, versions, config, every figure) to
benchmarks/results/bench-<mode>-<host>.json; the tables are made from those files only.
The default sizes fit a 2-core CPU in a few minutes; on a GPU node pass larger ones, e.g.
`--batch 256 --steps 50 --processes 8 --precisions fp32 bf16 fp16`.

    python benchmarks/run_all.py [--data ../shared/flowers] [--batch 16] [--steps 4] [--processes 2] [--only step train]
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/flowers_resnet18.yaml"


def commands(args: argparse.Namespace) -> dict[str, list[str]]:
    common = ["--config", CONFIG, f"data.root={args.data}", "model.pretrained=none", "train.progress=lines"]
    step_batch = [*common, f"train.global_batch_size={args.batch}"]
    return {
        "loader": ["loader", *common, "train.global_batch_size=64", "--repeats", "2", "--epochs", "1"],
        "loader-plain": [
            "loader",
            *common,
            "train.global_batch_size=64",
            "data.rotation=0",
            "data.color_jitter=0",
            "--repeats",
            "2",
            "--epochs",
            "1",
        ],
        "step": [
            "step",
            *step_batch,
            "--warmup",
            "1",
            "--steps",
            "2",
            "--repeats",
            "3",
            "--matmul-size",
            "4096",
            "--precisions",
            *args.precisions,
        ],
        "train": ["train", *step_batch, "--warmup", "1", "--steps", str(args.steps)],
        "train-channels_last": [
            "train",
            *step_batch,
            "model.channels_last=true",
            "--warmup",
            "1",
            "--steps",
            str(args.steps),
        ],
        "scaling": [
            "scaling",
            *step_batch,
            "--warmup",
            "1",
            "--steps",
            str(args.steps),
            "--max-processes",
            str(args.processes),
        ],
    }


def tables(results: dict[str, dict]) -> str:
    lines = []
    for name in ("loader", "loader-plain"):
        if name in results:
            r = results[name]["results"]
            med = {row["setting"]: row["images_per_s"]["median"] for row in r["rows"]}
            lines.append(
                f"| loader ({'recipe' if name == 'loader' else 'crop + flip'}, batch {r['batch']}, {r['workers']} threads) | "
                f"DALI {med['dali']:.0f}, PyTorch {med['torch']:.0f}, DALI decode only {med['dali_decode_only']:.0f}, "
                f"PIL decode only {med['pil_decode_only']:.0f} img/s"
                + (
                    f"; DALI with DALI's rotate/colour ops instead of the fused kernel {med['dali_with_dali_ops']:.0f}"
                    if "dali_with_dali_ops" in med
                    else ""
                )
                + f" | DALI/PyTorch {r['ratio_dali_over_torch']:.2f}x | >= 2.0x |"
            )
    if "step" in results:
        r = results["step"]["results"]
        for row in r["rows"]:
            peak = r["matmul_peak"][row["precision"]]["flops_per_s"]["max"]
            lines.append(
                f"| step ({row['precision']} {row['memory_format']}, {r['image_size']} px, batch {r['batch']}) | "
                f"{row['images_per_s']['median']:.1f} img/s ({row['images_per_s']['min']:.1f}-{row['images_per_s']['max']:.1f}), "
                f"{row['achieved_flops_per_s'] / 1e9:.0f} GFLOP/s of {peak / 1e9:.0f} (matmul {r['matmul_peak'][row['precision']]['size']}²) | "
                f"{100 * row['fraction_of_matmul_peak']:.0f}% of matmul | >= 80% |"
            )
    for name in ("train", "train-channels_last"):
        if name in results:
            r = results[name]["results"]
            f = r["fractions"]
            lines.append(
                f"| {name.replace('-', ' ')} ({r['loader']}, batch {r['global_batch']}) | {r['images_per_s']:.1f} img/s: "
                f"data wait {100 * f['data wait']:.0f}%, compute {100 * f['compute']:.0f}% | bottleneck {r['bottleneck']} → "
                f"{r['advice']} | loop >= 95% of step |"
            )
    if "scaling" in results:
        for row in results["scaling"]["results"]["rows"]:
            lines.append(
                f"| scaling, {row['processes']} process(es) | {row['images_per_s']:.1f} img/s | efficiency "
                f"{100 * row['efficiency']:.0f}% (bottleneck {row['bottleneck']}) | |"
            )
    return "| measurement | figures | result | target |\n|---|---|---|---|\n" + "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "flowers"))
    parser.add_argument("--batch", type=int, default=16, help="per-process batch of the step, train and scaling runs")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--precisions", nargs="+", default=["fp32"])
    parser.add_argument("--only", nargs="+", help="run only these (the others are read from earlier JSON files)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()

    host = socket.gethostname()
    results = {}
    for name, cmd in commands(args).items():
        path = args.out / f"bench-{name}-{host}.json"
        if args.only is None or name in args.only:
            full = [sys.executable, "-m", "flowers_dist", "bench", *cmd, "--out", str(path)]
            print("$ flowers-dist bench " + " ".join(cmd), flush=True)
            subprocess.run(full, cwd=REPO, check=True)
        if path.is_file():
            results[name] = json.loads(path.read_text())
    print()
    print(tables(results))


if __name__ == "__main__":
    main()
