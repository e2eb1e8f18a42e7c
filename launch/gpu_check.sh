#!/usr/bin/env bash
# The first GPU run: check the DALI GPU path on a host with one GPU and no network, inside one
# short device window. Run from the project root:
#
#   launch/gpu_check.sh [WHEEL_DIR] [--dry-run | --preflight-only] [-- gpu_check.py arguments]   # WHEEL_DIR: .whl
#
# Steps, each failing in seconds with a one-line reason:
#   1. join split wheels (NAME.whl.part-00, -01, ... from launch/gpu_wheels.sh);
#   2. pre-flight (launch/gpu_preflight.py): import every module the check uses and print its
#      version (torch, torchvision, numpy, packaging, accelerate, timm, yaml, PIL, DALI and its
#      nvImageCodec/nvJPEG/nvCOMP), check that they fit together (torchvision built for this
#      torch, DALI's CUDA major = torch's, every declared requirement met), name the wheel to
#      carry for anything missing; then install only what is missing, offline, and check again;
#   3. launch/gpu_check.py: the checks and figures, ending with one table (every check, every
#      figure beside its goal; docs/gpu-check.md says how to read it).
# --dry-run (CI, on the CPU): the same steps on the same wheels and file layout, with pip's
# --dry-run against the host's Python 3.12 tags and every CRC of every wheel checked, then
# `gpu_check.py --dry-run`, which runs every step that does not need CUDA, at tiny sizes.
#
# The device window (15 minutes of device time, machine start-up included; 64 MiB carried per
# call; the machine is handed back after 30 s idle, so the calls follow each other at once):
#   prepare here:  launch/gpu_wheels.sh .whl                      # ~284 MB in 55 MiB pieces
#                  mkdir -p .gpu_carry && cp -r ../shared/flowers/val .gpu_carry/val   # 45 MB, ignored
#                  launch/gpu_check.sh .whl --dry-run             # everything that needs no GPU
#   call 1: carry .whl/SHA256SUMS, .whl/nvidia_dali*.part-00   command: launch/gpu_check.sh .whl --preflight-only
#           (starts the machine, minutes; the pre-flight prints the host's modules and what is missing)
#   call 2: carry .whl/nvidia_dali*.part-01            command: true
#   call 3: carry .whl/nvidia_dali*.part-02, -03       command: true
#   call 4: carry the remaining .whl/*.whl (~60 MB)     command: true
#   call 5: carry .gpu_carry/val (45 MB)                command: launch/gpu_check.sh .whl -- --data .gpu_carry --out "$OUT"
#           (timeout_s 600; gpu_check.py prints its own estimate first, under 10 minutes)
#   If call 1 names a module that no wheel here provides, stop and add its wheel before calls 2-5.
#
# Environment:
#   PYTHON   the interpreter to install into and run (default python)
set -euo pipefail

PYTHON=${PYTHON:-python}
wheel_dir=.whl
if [[ $# -gt 0 && "$1" != --* ]]; then
    wheel_dir=$1
    shift
fi
dry=()
preflight_only=0
while [[ $# -gt 0 && "$1" != "--" ]]; do
    case "$1" in
        --dry-run) dry=(--dry-run) ;;
        --preflight-only) preflight_only=1 ;;
        *) echo "gpu_check: unknown option $1 (see the header of $0)" >&2; exit 2 ;;
    esac
    shift
done
[[ "${1:-}" == "--" ]] && shift

# 1. Join split wheels (the pieces sort by name, so a glob joins them in order), each checked
# against SHA256SUMS from gpu_wheels.sh before its pieces go: a missing piece keeps them all, to
# be completed by a later carry. The pre-flight alone (--preflight-only) joins nothing.
shopt -s nullglob
if (( ! preflight_only )); then
    for first in "$wheel_dir"/*.whl.part-00; do
        wheel=${first%.part-00}
        name=$(basename "$wheel")
        pieces=("$wheel".part-*)
        want=$(awk -v n="$name" '$2 == n || $2 == "./" n {print $1}' "$wheel_dir/SHA256SUMS" 2>/dev/null || true)
        [[ -n "$want" ]] || { echo "gpu_check: no checksum for $name in $wheel_dir/SHA256SUMS (made by launch/gpu_wheels.sh)" >&2; exit 2; }
        cat "${pieces[@]}" > "$wheel.tmp"
        if [[ "$(sha256sum < "$wheel.tmp" | cut -d' ' -f1)" != "$want" ]]; then
            rm "$wheel.tmp"
            echo "gpu_check: $name: its ${#pieces[@]} pieces do not make the wheel (a piece is missing or cut): carry the rest" >&2
            exit 2
        fi
        mv "$wheel.tmp" "$wheel"
        rm "${pieces[@]}"
        echo "gpu_check: joined $name ($(stat -c %s "$wheel") bytes, checksum ok)"
    done
fi

# 2. Pre-flight, offline install of what is missing, pre-flight again (in the same command).
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled
if (( preflight_only )); then
    exec "$PYTHON" launch/gpu_preflight.py --wheels "$wheel_dir" "${dry[@]}"
fi
"$PYTHON" launch/gpu_preflight.py --wheels "$wheel_dir" --install "${dry[@]}"

# 3. The checks, in a fresh interpreter that sees what was just installed.
exec "$PYTHON" launch/gpu_check.py "${dry[@]}" "$@"
