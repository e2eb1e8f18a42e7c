"""What a run or a benchmark ran on: the code version, the library versions and the hardware, saved beside its figures."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch


def git_commit() -> str | None:
    """The commit of the checkout this package runs from; None outside a git checkout (an installed wheel)."""
    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "HEAD"],
                capture_output=True,
                text=True,
                timeout=5,
                check=False,
                cwd=Path(__file__).resolve().parent,
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        return None


def environment(world_size: int, num_nodes: int, device: torch.device) -> dict[str, Any]:
    """Code version, library versions and hardware, saved with every run (environment.json, the W&B config, bench.json)."""
    import accelerate
    import timm
    import torchvision

    devices = (
        [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if device.type == "cuda"
        else [platform.processor() or platform.machine()]
    )
    return {
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "accelerate": accelerate.__version__,
        "host": platform.node(),
        "device_type": device.type,
        "devices": devices,
        "cpu_count": os.cpu_count(),
        "world_size": world_size,
        "num_nodes": num_nodes,
    }
