"""The job scripts in launch/: shellcheck-clean, torchrun.sh forms a 2-process world, the GPU check's offline install."""

from __future__ import annotations

import hashlib
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


def test_gpu_check_joins_split_wheels_and_installs_them_offline(tmp_path):
    # The part of the GPU check that can run here: wheels split into pieces are joined byte for
    # byte and handed to an offline pip, then gpu_check.py gets the arguments after `--`.
    # PYTHON is a stand-in that records what the script asks of it.
    wheels = tmp_path / "whl"
    wheels.mkdir()
    big = os.urandom(3 * 1024 * 1024 + 17)
    for i in range(4):  # 1 MiB pieces, as `split -b 1M -d` names them
        (wheels / f"nvidia_dali-2.4.0-py3-none-any.whl.part-{i:02d}").write_bytes(big[i * 2**20:(i + 1) * 2**20])
    (wheels / "six-1.17.0-py2.py3-none-any.whl").write_bytes(b"small wheel")
    log = tmp_path / "calls.log"
    stub = tmp_path / "python"
    stub.write_text(f"""#!/usr/bin/env bash
if [[ "$1" == -c && "$2" == "import nvidia.dali" ]]; then exit 1; fi  # not installed yet
if [[ "$1" == -m && "$2" == pip ]]; then
  shift 2
  for a in "$@"; do [[ "$a" == *.whl ]] && sha256sum "$a" >> {log}; [[ "$a" == --* ]] && echo "pip $a" >> {log}; done
  exit 0
fi
echo "ran $*" >> {log}
""")
    stub.chmod(0o755)
    proc = subprocess.run(["bash", "launch/gpu_check.sh", str(wheels), "--", "--steps", "3"], cwd=REPO,
                          env={**os.environ, "PYTHON": str(stub)}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    calls = log.read_text()
    assert hashlib.sha256(big).hexdigest() in calls, "the joined wheel differs from the original"
    assert hashlib.sha256(b"small wheel").hexdigest() in calls
    assert "pip --no-index" in calls and "pip --no-deps" in calls
    assert "ran launch/gpu_check.py --steps 3" in calls
    assert not list(wheels.glob("*.tmp"))


def test_gpu_check_says_so_when_no_gpu_is_visible():
    proc = subprocess.run([sys.executable, "launch/gpu_check.py"], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 1 and "no CUDA device visible" in proc.stderr
