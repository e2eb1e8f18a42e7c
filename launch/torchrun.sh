#!/usr/bin/env bash
# Train with `torchrun` and a c10d rendezvous: N processes on this node, or this node's share of a
# multi-node job (node ranks are assigned at rendezvous). Every argument goes to `flowers-dist train`.
# Run from the project root.
#
# Usage:
#   launch/torchrun.sh --config configs/flowers_resnet18.yaml [section.key=value ...]
#   NPROC=2 launch/torchrun.sh --config configs/quickstart.yaml    # 2 processes (CPU where there is no GPU)
#   # two nodes; the same command on each:
#   NUM_MACHINES=2 MAIN_PROCESS_IP=10.0.0.1 MAIN_PROCESS_PORT=29500 launch/torchrun.sh --config ...
#
# Environment:
#   NPROC              processes on this node (default: the GPUs torch sees, else 1)
#   CPU=1              force CPU processes even where there are GPUs (adds train.device=cpu)
#   NUM_MACHINES       nodes in the job (default 1)
#   MAIN_PROCESS_IP    host of the c10d rendezvous store, one of the nodes (required with NUM_MACHINES > 1)
#   MAIN_PROCESS_PORT  its port (default: a free port on one node, 29500 on several)
#   RDZV_ID            job id shared by all nodes (default: $SLURM_JOB_ID, else flowers-dist)
set -euo pipefail

# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

num_machines=${NUM_MACHINES:-1}
if (( num_machines > 1 )); then
    : "${MAIN_PROCESS_IP:?set MAIN_PROCESS_IP to the host of the rendezvous store (one of the nodes)}"
    endpoint="$MAIN_PROCESS_IP:${MAIN_PROCESS_PORT:-29500}"
else
    # Port 0 lets the store pick a free port (what --standalone does), so two jobs on one host don't clash.
    endpoint="127.0.0.1:${MAIN_PROCESS_PORT:-0}"
fi

exec torchrun --nnodes "$num_machines" --nproc_per_node "$NPROC" \
    --rdzv_backend c10d --rdzv_endpoint "$endpoint" --rdzv_id "${RDZV_ID:-${SLURM_JOB_ID:-flowers-dist}}" \
    -m flowers_dist train "$@" "${CPU_OVERRIDES[@]}"
