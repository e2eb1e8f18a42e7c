"""The job scripts in launch/: shellcheck-clean, torchrun.sh forms a 2-process world, the GPU check's offline install."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from conftest import REPO, SHARED_FLOWERS, TINY, metrics

SCRIPTS = sorted(str(p.relative_to(REPO)) for p in (REPO / "launch").iterdir() if p.suffix in {".sh", ".sbatch"})


@pytest.mark.skipif(
    shutil.which("shellcheck") is None, reason="shellcheck is not installed (apt-get install shellcheck)"
)
def test_scripts_are_shellcheck_clean():
    assert "launch/slurm.sbatch" in SCRIPTS and "launch/torchrun.sh" in SCRIPTS
    # -x follows the `source launch/common.sh` lines.
    proc = subprocess.run(["shellcheck", "-x", *SCRIPTS], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.e2e
def test_torchrun_script_runs_two_processes(tmp_path):
    # The venv's bin first, so the script finds this interpreter's torchrun; on this CPU-only host the
    # training code forces the CPU and the two processes form one gloo group. No MAIN_PROCESS_PORT:
    # the single-node default (port 0, a free one) is under test.
    env = {
        **{k: v for k, v in os.environ.items() if k != "MAIN_PROCESS_PORT"},
        "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}",
        "PYTHON": sys.executable,
        "NPROC": "2",
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "disabled",
        "HF_HUB_OFFLINE": "1",
    }
    proc = subprocess.run(
        [
            "bash",
            "launch/torchrun.sh",
            "--config",
            "configs/quickstart.yaml",
            *TINY,
            "train.epochs=1",
            "train.max_steps_per_epoch=2",
            f"train.output_dir={tmp_path}",
            "train.name=torchrun",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    start = metrics(tmp_path / "torchrun")[0]
    assert start["event"] == "start" and start["world_size"] == 2


def _stub_python(tmp_path, wheels):
    """A PYTHON that records its calls, with the sha256 of each .whl in the wheel folder at that moment."""
    log = tmp_path / "calls.log"
    stub = tmp_path / "python"
    stub.write_text(f"""#!/usr/bin/env bash
echo "ran $*" >> {log}
for w in {wheels}/*.whl; do [[ -e "$w" ]] && sha256sum "$w" >> {log}; done
exit 0
""")
    stub.chmod(0o755)
    return stub, log


@pytest.mark.e2e
def test_gpu_check_joins_split_wheels_then_runs_preflight_install_and_the_checks(tmp_path):
    # Wheels split into pieces are joined byte for byte (pieces removed), then gpu_check.py gets its
    # pre-flight with --install on that folder and, in a fresh interpreter, the checks with the arguments after `--`.
    wheels = tmp_path / "whl"
    wheels.mkdir()
    big = os.urandom(3 * 1024 * 1024 + 17)
    for i in range(4):  # 1 MiB pieces, as `split -b 1M -d` names them
        (wheels / f"nvidia_dali-2.4.0-py3-none-any.whl.part-{i:02d}").write_bytes(big[i * 2**20 : (i + 1) * 2**20])
    (wheels / "six-1.17.0-py2.py3-none-any.whl").write_bytes(b"small wheel")
    (wheels / "SHA256SUMS").write_text(
        f"{hashlib.sha256(big).hexdigest()}  nvidia_dali-2.4.0-py3-none-any.whl\n"
        f"{hashlib.sha256(b'small wheel').hexdigest()}  six-1.17.0-py2.py3-none-any.whl\n"
    )
    stub, log = _stub_python(tmp_path, wheels)
    proc = subprocess.run(
        ["bash", "launch/gpu_check.sh", str(wheels), "--", "--batch", "64"],
        cwd=REPO,
        env={**os.environ, "PYTHON": str(stub)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    calls = log.read_text()
    assert hashlib.sha256(big).hexdigest() in calls, "the joined wheel differs from the original"
    assert hashlib.sha256(b"small wheel").hexdigest() in calls
    ran = [line for line in calls.splitlines() if line.startswith("ran ")]
    assert ran == [f"ran launch/gpu_preflight.py --wheels {wheels} --install", "ran launch/gpu_check.py --batch 64"]
    assert not list(wheels.glob("*.tmp")) and not list(wheels.glob("*.part-*"))


@pytest.mark.e2e
@pytest.mark.parametrize("carried", [(0, 1, 3), (0, 1, 2)])  # a piece in the middle, or the last one, not carried yet
def test_gpu_check_keeps_the_pieces_of_an_incomplete_wheel(tmp_path, carried):
    wheels = tmp_path / "whl"
    wheels.mkdir()
    big = os.urandom(4 * 100)
    for i in carried:
        (wheels / f"nvidia_dali-2.4.0-py3-none-any.whl.part-{i:02d}").write_bytes(big[i * 100 : (i + 1) * 100])
    (wheels / "SHA256SUMS").write_text(f"{hashlib.sha256(big).hexdigest()}  nvidia_dali-2.4.0-py3-none-any.whl\n")
    stub, log = _stub_python(tmp_path, wheels)
    proc = subprocess.run(
        ["bash", "launch/gpu_check.sh", str(wheels)],
        cwd=REPO,
        env={**os.environ, "PYTHON": str(stub)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "carry the rest" in proc.stderr
    assert not log.exists(), "nothing may be installed or run after a failed join"
    assert sorted(p.name[-2:] for p in wheels.glob("*.part-*")) == [f"{i:02d}" for i in carried], (
        "the pieces must wait for the rest"
    )
    assert not list(wheels.glob("*.whl*[!0-9]"))  # no joined or temporary wheel left


@pytest.mark.e2e
def test_gpu_check_preflight_names_what_to_carry(tmp_path):
    # A module that does not import: the pre-flight prints it as missing, says which wheel to carry,
    # and fails in seconds, before any install or GPU work. Here `timm` is hidden by a shadowing package.
    shadow = tmp_path / "shadow"
    (shadow / "timm").mkdir(parents=True)
    (shadow / "timm" / "__init__.py").write_text("raise ImportError('timm hidden for the test')\n")
    proc = subprocess.run(
        [sys.executable, "launch/gpu_preflight.py", "--dry-run"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(shadow)},
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.strip().startswith("timm "))
    assert "MISSING" in line and "CARRY a wheel of timm" in line
    for module in (
        "torch",
        "torchvision",
        "numpy",
        "packaging",
        "accelerate",
        "yaml",
        "PIL",
        "nvidia.dali",
        "nvidia.nvimgcodec",
    ):
        assert any(x.strip().startswith(module + " ") and "MISSING" not in x for x in proc.stdout.splitlines()), module
    assert "pre-flight failed: 1 missing (timm)" in proc.stderr


@pytest.mark.e2e
@pytest.mark.skipif(not SHARED_FLOWERS.is_dir() and not (REPO / "data" / "flowers_sample").is_dir(), reason="no photos")
def test_gpu_check_dry_run_rehearses_everything_but_cuda(tmp_path):
    # The whole GPU run on the CPU, on the real wheel list and the carried layout: gpu_wheels.sh
    # downloads the Python 3.12 wheels (pip's own cache makes repeats cheap) and splits the big
    # ones; gpu_check.sh joins them, CRC-checks every wheel and has pip resolve them, offline,
    # against the GPU host's Python 3.12 tags; then gpu_check.py --dry-run runs every stage at tiny sizes.
    wheels = tmp_path / "whl"
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}",
    }
    got = subprocess.run(
        ["bash", "launch/gpu_wheels.sh", str(wheels)], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    if got.returncode and ("NewConnectionError" in got.stderr or "Could not find a version" in got.stderr):
        pytest.skip(f"PyPI is not reachable: {got.stderr.strip().splitlines()[-1]}")
    assert got.returncode == 0, got.stderr[-3000:]
    assert list(wheels.glob("nvidia_dali_cuda130-*.whl.part-00")), "the DALI wheel was not split"
    assert all(p.stat().st_size < 60 * 2**20 for p in wheels.iterdir()), "a piece is over one transfer"
    carry = tmp_path / "carry"  # the layout gpu_check.sh's header carries: <carry>/val/<class>/*.jpg
    shutil.copytree(REPO / "data" / "flowers_sample" / "val", carry / "val")
    proc = subprocess.run(
        [
            "bash",
            "launch/gpu_check.sh",
            str(wheels),
            "--dry-run",
            "--",
            "--data",
            str(carry),
            "--out",
            str(tmp_path / "out"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    out = proc.stdout
    assert proc.returncode == 0, out[-4000:] + proc.stderr[-4000:]
    assert "pre-flight passed" in out and re.search(r"would install 3\d wheels", out)
    assert not list(wheels.glob("*.part-*"))
    estimate = float(re.search(r"estimated duration on an H200: (\d+) s", out).group(1))
    assert estimate < 600
    table = out[out.index("gpu_check --dry-run") :]
    for check in (
        "decode mixed (fancy) vs cpu",
        "eval loader gpu vs cpu",
        "delayed read of a dropped batch",
        "HW JPEG decoder",
        "no host sync per step, bf16",
        "loader dali",
        "loader torch",
        "train loop bf16 cl, batch 8",
        "train loop bf16 cl, batch 4",
        "time to first step",
        "25-epoch recipe, extrapolated",
        "gpu_check duration",
    ):
        assert check in table, check
    rows = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert not [r for r in rows if r["status"] == "FAIL"], rows


@pytest.mark.e2e
def test_gpu_check_says_so_when_no_gpu_is_visible():
    proc = subprocess.run(
        [sys.executable, "launch/gpu_check.py"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert proc.returncode == 1 and "no CUDA device visible" in proc.stderr
