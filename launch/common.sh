# shellcheck shell=bash
# Sourced by accelerate.sh and torchrun.sh, not run: how many processes this node starts, and CPU mode.
#
# Reads  NPROC (processes on this node; default: the GPUs torch sees, or 1 without any), CPU=1 (force
#        the CPU on a GPU host), PYTHON (default python).
# Sets   NPROC, OMP_NUM_THREADS (exported), and the array CPU_OVERRIDES to append to the train arguments.

PYTHON=${PYTHON:-python}
# shellcheck disable=SC2034  # read by the scripts that source this file
CPU_OVERRIDES=()
if [[ "${CPU:-0}" == 1 ]]; then
    # The config decides the device: train.device=cpu makes every process join one gloo group.
    # (accelerate's --cpu flag is no substitute: with it, --num_processes 2 starts a single process.)
    # shellcheck disable=SC2034
    CPU_OVERRIDES=(train.device=cpu)
    NPROC=${NPROC:-1}
fi
if [[ -z "${NPROC:-}" ]]; then
    # Ask torch rather than nvidia-smi: it honours CUDA_VISIBLE_DEVICES, as the training processes will.
    NPROC=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')
    (( NPROC > 0 )) || NPROC=1
fi
if ! [[ "$NPROC" =~ ^[1-9][0-9]*$ ]]; then
    echo "$(basename "$0"): NPROC must be a positive integer, got '$NPROC'" >&2
    exit 2
fi
if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
    # Launchers default to 1 thread per process; on the CPU that idles all but NPROC cores.
    OMP_NUM_THREADS=$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))
    export OMP_NUM_THREADS
fi
