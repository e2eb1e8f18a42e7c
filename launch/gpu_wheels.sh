#!/usr/bin/env bash
# Download the wheels launch/gpu_check.sh installs on a GPU host without network (Python 3.12,
# torch for CUDA 13, x86_64), and split the big ones into pieces that fit one transfer.
# Run on a machine with access to PyPI, from the project root:
#
#   launch/gpu_wheels.sh [DIR]        # DIR defaults to .whl (ignored by git)
#
# Two sets, versions as tested with DALI 2.4.0 (about 290 MB together):
# - DALI_WHEELS: DALI, its codecs (nvImageCodec, nvJPEG, nvCOMP; not the JPEG 2000 or TIFF
#   ones) and its pure-Python imports; installed whenever `import nvidia.dali` fails.
# - HOST_WHEELS: what the check imports from a torch host that may lack it (accelerate, timm,
#   yaml, PIL, numpy, packaging and their own imports); gpu_preflight.py installs one of these only
#   when its module is missing, so the host's own numpy or Pillow is never replaced.
# Neither set holds torch or torchvision: they must be the host's (gpu_check.py checks the pair).
#
# Pieces: wheels over 55 MiB are split with `split -b 55M -d` into NAME.whl.part-00, -01, ...;
# gpu_check.sh joins them and checks each joined wheel against SHA256SUMS (written here, before
# splitting). Every piece, and each call's whole carry, stays under 64 MiB.
set -euo pipefail

dir=${1:-.whl}
PYTHON=${PYTHON:-python}
DALI_WHEELS=(nvidia-dali-cuda130==2.4.0 nvidia-nvimgcodec-cu13==0.9.0.20 nvidia-libnvcomp-cu13==5.3.0.16
             nvidia-nvjpeg==13.3.2.43 astunparse==1.6.3 gast==0.7.0 six==1.17.0 optree==0.20.0
             makefun==1.16.0 nvtx==0.2.17 libcst==1.9.0 wheel==0.48.0)
HOST_WHEELS=(accelerate==1.15.0 timm==1.0.31 pyyaml==6.0.4 pillow==13.0.0 numpy==2.4.6 packaging==26.3
             psutil==7.2.2 safetensors==0.8.0 huggingface-hub==2.4.0 anyio==4.16.0 click==8.5.1
             filelock==4.3.1 fsspec==2026.9.0 h11==0.16.0 hf-xet==1.8.0 httpcore2==2.16.2 httpx2==2.16.2
             idna==3.20 tqdm==4.70.1 truststore==0.10.5 typing-extensions==4.16.0)
PIECE=55M
PIECE_BYTES=$((55 * 1024 * 1024))

mkdir -p "$dir"
"$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d "$dir" "${DALI_WHEELS[@]}" "${HOST_WHEELS[@]}"
# Checksums of the whole wheels, taken before splitting: gpu_check.sh joins a wheel only when its
# pieces add up to exactly these bytes, so a piece left behind cannot become a broken install.
(cd "$dir" && sha256sum -- *.whl > SHA256SUMS)
for w in "$dir"/*.whl; do
    if (( $(stat -c %s "$w") > PIECE_BYTES )); then
        split -b "$PIECE" -d "$w" "$w.part-"
        rm "$w"
    fi
done
echo "gpu_wheels: $(find "$dir" -maxdepth 1 -name '*.whl*' | wc -l) files, $(du -sm "$dir" | cut -f1) MB in $dir"
