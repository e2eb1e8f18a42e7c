"""The launch scripts end the way a user can read: the training's one-line error last, exit 2."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import REPO, TINY, free_port

pytestmark = pytest.mark.e2e


def test_user_error_is_the_last_line(tmp_path):
    """A config error under accelerate launch, 2 processes (about 35 s here, mostly imports): the launcher's traceback
    comes first, the one line last, and exit 2. torchrun.sh and one process take the same path (common.sh's
    run_launcher); the SLURM test covers srun's."""
    env = {
        **os.environ,
        "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}",
        "PYTHON": sys.executable,
        "NPROC": "2",
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "disabled",
        "HF_HUB_OFFLINE": "1",
        "MAIN_PROCESS_PORT": str(free_port()),
        "TMPDIR": str(tmp_path),
    }
    proc = subprocess.run(
        [
            "bash",
            "launch/accelerate.sh",
            "--config",
            "configs/quickstart.yaml",
            *TINY,
            "train.epochs=0",
            f"train.output_dir={tmp_path}",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert lines[-1].startswith("flowers-dist: error: ") and "train.epochs" in lines[-1], proc.stderr[-3000:]
    # The launcher's report of the failed workers comes before it.
    assert any("ChildFailedError" in line or "Traceback" in line for line in lines[:-1]), proc.stderr[-3000:]
    assert not list(tmp_path.glob("flowers-dist-error.*")), "the error file was left behind"
