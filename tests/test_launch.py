"""The job scripts in launch/: shellcheck-clean, and torchrun.sh forms a 2-process world."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, TINY, metrics

SCRIPTS = sorted(str(p.relative_to(REPO)) for p in (REPO / "launch").iterdir() if p.suffix in {".sh", ".sbatch"})


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed (apt-get install shellcheck)")
def test_scripts_are_shellcheck_clean():
    assert "launch/slurm.sbatch" in SCRIPTS and "launch/torchrun.sh" in SCRIPTS
    # -x follows the `source launch/common.sh` lines.
    proc = subprocess.run(["shellcheck", "-x", *SCRIPTS], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_torchrun_script_runs_two_processes(tmp_path):
    # The venv's bin first, so the script finds this interpreter's torchrun; on this CPU-only host the
    # training code forces the CPU and the two processes form one gloo group. No MAIN_PROCESS_PORT:
    # the single-node default (port 0, a free one) is under test.
    env = {**{k: v for k, v in os.environ.items() if k != "MAIN_PROCESS_PORT"}, "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}", "PYTHON": sys.executable,
           "NPROC": "2", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(["bash", "launch/torchrun.sh", "--config", "configs/quickstart.yaml", *TINY, "train.epochs=1",
                           "train.max_steps_per_epoch=2", f"train.output_dir={tmp_path}", "train.name=torchrun"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    start = metrics(tmp_path / "torchrun")[0]
    assert start["event"] == "start" and start["world_size"] == 2
