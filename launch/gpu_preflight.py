"""The GPU check's pre-flight: import and print every module it uses, check that they fit together, install carried wheels.

Run by launch/gpu_check.sh before anything else, so a missing or mismatched module fails in
seconds and names the wheel to carry:

    python launch/gpu_preflight.py [--wheels .whl] [--install] [--dry-run]

Only the standard library is imported at the top: torch and the rest are what is being checked.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
import zipfile
from importlib import metadata
from pathlib import Path

# Everything the check imports, in import order: (module, distribution). torch and torchvision
# are the host's own (never carried): the check must run against the torch it will train with.
MODULES = [
    ("torch", "torch"),
    ("torchvision", "torchvision"),
    ("numpy", "numpy"),
    ("packaging", "packaging"),
    ("yaml", "pyyaml"),
    ("PIL", "pillow"),
    ("accelerate", "accelerate"),
    ("timm", "timm"),
    ("nvidia.dali", "nvidia-dali-cuda130"),
    ("nvidia.dali.plugin.pytorch", "nvidia-dali-cuda130"),
    ("nvidia.nvimgcodec", "nvidia-nvimgcodec-cu13"),
]
# Libraries DALI loads at run time (no module to import): their distributions must be installed.
LIBRARIES = ["nvidia-nvjpeg", "nvidia-libnvcomp-cu13"]
HOST_ONLY = {"torch", "torchvision"}
# Python tags of the GPU host (gpu_wheels.sh downloads for them); the dry run checks the wheels against them.
HOST_TAGS = [
    "--python-version",
    "3.12",
    "--implementation",
    "cp",
    "--abi",
    "cp312",
    "--abi",
    "abi3",
    "--abi",
    "none",
    *[
        a
        for p in (
            "manylinux_2_28_x86_64",
            "manylinux_2_27_x86_64",
            "manylinux_2_17_x86_64",
            "manylinux2014_x86_64",
            "manylinux_2_12_x86_64",
            "manylinux2010_x86_64",
            "any",
        )
        for a in ("--platform", p)
    ],
]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _wheels(wheel_dir: Path | None, pieces: bool = False) -> dict[str, Path]:
    """Carried wheels by normalised distribution name; pieces=True also counts a split wheel's first piece."""
    if wheel_dir is None or not wheel_dir.is_dir():
        return {}
    found = sorted(wheel_dir.glob("*.whl")) + (sorted(wheel_dir.glob("*.whl.part-00")) if pieces else [])
    return {_norm(w.name.split("-")[0]): w for w in found}


# ---------------------------------------------------------------------------------------------- pre-flight


def _requirement_problems(dists: list[str]) -> list[str]:
    """Declared requirements (no extras) of the given installed distributions, and of theirs, that are not met."""
    from packaging.requirements import Requirement

    problems, seen, todo = [], set(), list(dists)
    while todo:
        dist = _norm(todo.pop())
        if dist in seen or _version(dist) is None:
            continue
        seen.add(dist)
        for text in metadata.requires(dist) or []:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            have = _version(req.name)
            if have is None:
                problems.append(f"{dist} needs {req} but {req.name} is not installed")
            elif req.specifier and not req.specifier.contains(have, prereleases=True):
                problems.append(f"{dist} needs {req} but {req.name} {have} is installed")
            else:
                todo.append(req.name)
    return problems


def _fit_problems(versions: dict[str, str | None], dry: bool) -> list[str]:
    """The pairings that metadata does not state: torchvision built for this torch, one CUDA major everywhere."""
    problems = []
    torch_v, tv_v = versions.get("torch"), versions.get("torchvision")
    if torch_v and tv_v:
        (t_major, t_minor), (v_major, v_minor) = (
            tuple(int(x) for x in v.split("+")[0].split(".")[:2]) for v in (torch_v, tv_v)
        )
        if t_major == 2 and (v_major, v_minor) != (0, t_minor + 15):
            problems.append(
                f"torchvision {tv_v} is not the build for torch {torch_v} (torch 2.N pairs with torchvision 0.N+15)"
            )
        t_local, v_local = (v.split("+")[1] if "+" in v else "" for v in (torch_v, tv_v))
        if t_local and v_local and t_local != v_local:
            problems.append(f"torch {torch_v} and torchvision {tv_v} are builds for different CUDA versions")
    import torch

    cuda = torch.version.cuda
    for dist in ("nvidia-dali-cuda130", "nvidia-nvimgcodec-cu13", "nvidia-libnvcomp-cu13"):
        if versions.get(dist) and cuda:
            wanted = re.search(r"cu(?:da)?(\d\d)", dist).group(1)
            if cuda.split(".")[0] != wanted:
                problems.append(
                    f"{dist} is for CUDA {wanted} but torch runs CUDA {cuda} (carry the cuda{cuda.split('.')[0]}0 wheels)"
                )
    if cuda is None and not dry:
        problems.append(f"torch {torch_v} is a CPU build: the GPU check needs torch for CUDA")
    return problems


def preflight(wheel_dir: Path | None, dry: bool) -> tuple[list[str], list[str]]:
    """Import and print every module with its version; returns (missing distributions, problems)."""
    wheels = _wheels(wheel_dir, pieces=True)  # call 1 of the window carries the DALI wheel's first piece only
    versions: dict[str, str | None] = {}
    missing, problems = [], []
    print(f"gpu_check pre-flight: Python {sys.version.split()[0]} ({sys.executable})")
    for module, dist in MODULES:
        start = time.perf_counter()
        try:
            __import__(module)
            versions[dist] = _version(dist)
            note = f"{versions[dist]}  ({time.perf_counter() - start:.1f} s)"
        except Exception as exc:  # ImportError, or OSError/RuntimeError from a library that does not load
            versions[dist] = None
            missing.append(dist)
            line = str(exc).strip().splitlines()[0][:100] if str(exc).strip() else type(exc).__name__
            carry = (
                "the host's own (cannot be carried)"
                if dist in HOST_ONLY
                else (
                    f"carried: {wheels[_norm(dist)].name}"
                    if _norm(dist) in wheels
                    else f"CARRY a wheel of {dist} (launch/gpu_wheels.sh)"
                )
            )
            note = f"MISSING ({type(exc).__name__}: {line}); {carry}"
        print(f"  {module:<28} {note}")
    for dist in LIBRARIES:
        versions[dist] = _version(dist)
        if versions[dist] is None:
            missing.append(dist)
        print(
            f"  {dist:<28} {versions[dist] or 'MISSING; ' + ('carried' if _norm(dist) in wheels else 'CARRY its wheel')}"
        )
    if versions.get("torch"):
        problems += _fit_problems(versions, dry)
        problems += _requirement_problems([d for d in versions if versions[d]])
        import torch

        if torch.cuda.is_available():
            print(
                f"  GPU: {torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}, "
                f"NVIDIA_DRIVER_CAPABILITIES={os.environ.get('NVIDIA_DRIVER_CAPABILITIES', '(unset)')}"
            )
        elif not dry:
            problems.append("no CUDA device visible to torch")
    for problem in problems:
        print(f"  PROBLEM: {problem}")
    return missing, problems


def install(wheel_dir: Path, dry: bool) -> int:
    """pip-install, offline, every carried wheel whose distribution is not installed here (never replacing the host's).

    With dry=True: every wheel of the folder, as pip --dry-run against the GPU host's Python 3.12
    tags, after a CRC check of every member (a badly joined wheel fails here, not on the host).
    """
    wheels = _wheels(wheel_dir)
    if dry:
        for wheel in wheels.values():
            with zipfile.ZipFile(wheel) as zf:
                bad = zf.testzip()
            if bad is not None:
                print(f"gpu_check: {wheel.name}: member {bad} fails its CRC", file=sys.stderr)
                return 2
        chosen = list(wheels.values())
        with tempfile.TemporaryDirectory() as target:
            cmd = [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--dry-run",
                "--no-index",
                "--no-deps",
                "--only-binary=:all:",
                "--disable-pip-version-check",
                *HOST_TAGS,
                "--target",
                target,
                *map(str, chosen),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True)
    else:
        chosen = [w for d, w in wheels.items() if _version(d) is None]
        if not chosen:
            print("gpu_check: nothing to install")
            return 0
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-index",
            "--no-deps",
            "--disable-pip-version-check",
            *map(str, chosen),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        print(f"gpu_check: pip failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
        return 2
    print(
        f"gpu_check: {'would install' if dry else 'installed'} {len(chosen)} wheels: "
        + ", ".join(sorted(w.name.split("-")[0] for w in chosen))
    )
    return 0


def preflight_main(args: argparse.Namespace) -> int:
    missing, problems = preflight(args.wheels, args.dry_run)
    if args.install and args.wheels is not None:
        if install(args.wheels, args.dry_run):
            return 2
        if not args.dry_run and missing:
            # A fresh interpreter sees the new packages; modules that failed to import stay failed in this one.
            return subprocess.run([sys.executable, __file__, "--wheels", str(args.wheels)]).returncode
    unfixable = [d for d in missing if d in HOST_ONLY or _norm(d) not in _wheels(args.wheels, pieces=True)]
    if args.install and not args.dry_run:
        unfixable = missing
    if unfixable or problems:
        print(
            f"gpu_check: pre-flight failed: {len(unfixable)} missing ({', '.join(unfixable) or '-'}), "
            f"{len(problems)} problem(s)",
            file=sys.stderr,
        )
        return 2
    print("gpu_check: pre-flight passed" + (" (missing modules have carried wheels)" if missing else ""))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheels", type=Path, help="folder of carried wheels (split ones joined by gpu_check.sh)")
    parser.add_argument(
        "--install", action="store_true", help="pip-install the carried wheels whose distributions are missing"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="CPU rehearsal: no CUDA needed; pip --dry-run for the host's Python 3.12"
    )
    return preflight_main(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
