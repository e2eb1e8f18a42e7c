#!/usr/bin/env bash
# Train with `accelerate launch`: N GPUs (or N CPU processes) on this node, or this node's share of a
# multi-node job. Every argument goes to `flowers-dist train`. Run from the project root.
#
# Usage:
#   launch/accelerate.sh --config configs/flowers_resnet18.yaml [section.key=value ...]
#   NPROC=4 launch/accelerate.sh --config configs/flowers_resnet18.yaml     # 4 of this node's GPUs
#   CPU=1 NPROC=2 launch/accelerate.sh --config configs/quickstart.yaml     # 2 CPU processes (gloo)
#   # two nodes, 8 GPUs each; run on every node with its own MACHINE_RANK:
#   NUM_MACHINES=2 MACHINE_RANK=0 MAIN_PROCESS_IP=10.0.0.1 launch/accelerate.sh --config ...
#
# Environment:
#   NPROC              processes on this node (default: the GPUs torch sees, else 1)
#   CPU=1              force CPU processes even where there are GPUs (adds train.device=cpu)
#   NUM_MACHINES       nodes in the job (default 1)
#   MACHINE_RANK       this node's rank, 0 .. NUM_MACHINES-1 (default 0)
#   MAIN_PROCESS_IP    address of the rank-0 node (required with NUM_MACHINES > 1)
#   MAIN_PROCESS_PORT  its rendezvous port (default 29500)
#   RDZV_TIMEOUT       seconds the machines may take to find each other (default 120), then an error
#
# Exit codes: those of `flowers-dist train` (0 done, 2 one-line error, printed last, 75 stopped by a
# signal after a checkpoint: run the same command again to resume), or the launcher's own.
# SIGTERM or SIGUSR1 to this script reaches every training process as SIGTERM.
set -euo pipefail

# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

num_machines=${NUM_MACHINES:-1}
# --num_processes is the total over all nodes, not the count on this one.
total=$(( NPROC * num_machines ))
if (( total == 1 )); then
    # One process needs no launcher (accelerate refuses --multi_gpu with one), and its exit code survives.
    run_launcher "$PYTHON" -m flowers_dist train "$@" "${CPU_OVERRIDES[@]}"
fi
# Accelerator() receives the config's precision explicitly, so --mixed_precision here only
# silences the launcher's warning about defaults; it does not decide anything.
# Also on the CPU: --multi_gpu is what starts several processes (the code then picks gloo).
args=(--multi_gpu --num_processes "$total" --num_machines "$num_machines" --mixed_precision no --dynamo_backend no
      --rdzv_conf "timeout=$RDZV_TIMEOUT")
if (( num_machines > 1 )); then
    : "${MAIN_PROCESS_IP:?set MAIN_PROCESS_IP to the address of the rank-0 node}"
    check_host "$MAIN_PROCESS_IP"
    args+=(--machine_rank "${MACHINE_RANK:-0}" --main_process_ip "$MAIN_PROCESS_IP")
fi
if [[ -n "${MAIN_PROCESS_PORT:-}" ]]; then
    args+=(--main_process_port "$MAIN_PROCESS_PORT")
fi

run_launcher "$PYTHON" -m accelerate.commands.launch "${args[@]}" -m flowers_dist train "$@" "${CPU_OVERRIDES[@]}"
