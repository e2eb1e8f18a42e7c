"""What every bench mode shares: repeat statistics, the terminal table and the JSON result file."""

from __future__ import annotations

import json
import os
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from ..config import Config
from ..environment import environment


def spread(values: list[float]) -> dict[str, Any]:
    """Median and range of repeated measurements (all values kept for the record)."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": list(values)}


def table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    """Rows as an aligned text table; columns are (key, header, format spec)."""
    cells = [[h for _, h, _ in columns]] + [
        [format(r.get(k, ""), f) if r.get(k) is not None else "-" for k, _, f in columns] for r in rows
    ]
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in cells)


def out_path(out: Path | None, cfg: Config, mode: str) -> Path:
    if out is not None:
        return out
    return Path(cfg.train.output_dir) / f"bench-{mode}-{datetime.now().strftime('%Y%m%d-%H%M%S')}" / "bench.json"


def write_result(
    path: Path,
    mode: str,
    cfg: Config,
    device: torch.device,
    results: dict[str, Any],
    world_size: int = 1,
    num_nodes: int = 1,
) -> Path:
    """The figures with the machine, the versions and the config that produced them."""
    from ..data import dali_status

    env = {
        **environment(world_size, num_nodes, device),
        "dali": dali_status()[1],
        "torch_threads": torch.get_num_threads(),
        "load_average_at_end": os.getloadavg(),
    }  # other processes on the machine lower every figure
    return write_json(path, {**stamp(mode), "environment": env, "config": cfg.to_dict(), "results": results})


def stamp(mode: str) -> dict[str, Any]:
    """What every bench result opens with: its mode, when, and the command that made it."""
    return {
        "mode": mode,
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["flowers-dist", *sys.argv[1:]]) if sys.argv else None,
    }


def write_json(path: Path, record: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path
