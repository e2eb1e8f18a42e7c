#!/usr/bin/env bash
# GPU check of the DALI path on a host with one GPU and no network, in under 5 minutes: install DALI
# from wheel files brought along, then run launch/gpu_check.py (nvJPEG vs CPU decoding, evaluation
# GPU vs CPU, loader and bf16 end-to-end images/s). Run from the project root.
#
# Usage:
#   launch/gpu_check.sh [WHEEL_DIR] [-- gpu_check.py arguments]     # WHEEL_DIR defaults to .whl
#
# Preparing WHEEL_DIR on a machine with network (the host: Python 3.12, torch CUDA 13, x86_64).
# The three large wheels (~200, ~29 and ~25 MB) plus what `import nvidia.dali` needs and a
# Python 3.12 torch host may lack (~6 MB together); versions as tested with DALI 2.4.0:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
#       --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#       nvidia-dali-cuda130==2.4.0 nvidia-nvimgcodec-cu13==0.9.0.20 nvidia-libnvcomp-cu13==5.3.0.16 \
#       nvidia-nvjpeg==13.3.2.43 astunparse==1.6.3 gast==0.7.0 six==1.17.0 optree==0.20.0 \
#       makefun==1.16.0 nvtx==0.2.17 libcst==1.9.0
#   # Pieces under 60 MB each (for transfers that cap file sizes); this script joins them again:
#   (cd .whl && for w in *.whl; do if (( $(stat -c %s "$w") > 57671680 )); then split -b 55M -d "$w" "$w.part-" && rm "$w"; fi; done)
#
# Environment:
#   PYTHON   the interpreter to install into and run (default python)
set -euo pipefail

PYTHON=${PYTHON:-python}
wheel_dir=.whl
if [[ $# -gt 0 && "$1" != "--" ]]; then
    wheel_dir=$1
    shift
fi
[[ "${1:-}" == "--" ]] && shift

if "$PYTHON" -c 'import nvidia.dali' 2>/dev/null; then
    echo "gpu_check: nvidia.dali is already installed"
else
    [[ -d "$wheel_dir" ]] || { echo "gpu_check: no wheel folder $wheel_dir (see the header of $0)" >&2; exit 2; }
    # Join split wheels: name.whl.part-00, -01, ... sort by name, so a glob joins them in order.
    shopt -s nullglob
    for first in "$wheel_dir"/*.whl.part-00; do
        wheel=${first%.part-00}
        cat "$wheel".part-* > "$wheel.tmp"
        mv "$wheel.tmp" "$wheel"
        echo "gpu_check: joined $(basename "$wheel") ($(stat -c %s "$wheel") bytes)"
    done
    wheels=("$wheel_dir"/*.whl)
    (( ${#wheels[@]} > 0 )) || { echo "gpu_check: no .whl files in $wheel_dir" >&2; exit 2; }
    # --no-deps: the folder holds every dependency the import needs; pip must not look for the
    # optional nvJPEG2000/nvTIFF codecs (not needed for JPEG) on a host without network.
    "$PYTHON" -m pip install --no-index --no-deps --disable-pip-version-check "${wheels[@]}"
    "$PYTHON" -c 'import nvidia.dali, nvidia.dali.plugin.pytorch; print("gpu_check: DALI", nvidia.dali.__version__)'
fi

export HF_HUB_OFFLINE=1 WANDB_MODE=disabled
exec "$PYTHON" launch/gpu_check.py "$@"
