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
#   RDZV_TIMEOUT       seconds the nodes may take to find each other (default 120), then an error
#   MAX_RESTARTS       restarts of the whole process group after a failure (default 0); each restart
#                      resumes the run's last checkpoint (train.resume=auto) if the run folder is the same:
#                      pass train.name=... (under SLURM the default name, job name and id, already is)
#
# Exit codes: those of `flowers-dist train` (0 done, 2 one-line error, printed last) or torchrun's
# own (1 when a worker failed); 75 when SIGTERM/SIGUSR1 to this script stopped the run after a
# checkpoint (both reach every training process as SIGTERM): run the same command again to resume.
set -euo pipefail

# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

num_machines=${NUM_MACHINES:-1}
if (( num_machines > 1 )); then
    : "${MAIN_PROCESS_IP:?set MAIN_PROCESS_IP to the host of the rendezvous store (one of the nodes)}"
    check_host "$MAIN_PROCESS_IP"
    endpoint="$MAIN_PROCESS_IP:${MAIN_PROCESS_PORT:-29500}"
else
    # Port 0 lets the store pick a free port (what --standalone does), so two jobs on one host don't clash.
    endpoint="127.0.0.1:${MAIN_PROCESS_PORT:-0}"
fi

# join_timeout bounds the whole rendezvous, read_timeout each connection to the store (c10d backend).
run_launcher "$PYTHON" -m torch.distributed.run --nnodes "$num_machines" --nproc_per_node "$NPROC" \
    --rdzv_backend c10d --rdzv_endpoint "$endpoint" --rdzv_id "${RDZV_ID:-${SLURM_JOB_ID:-flowers-dist}}" \
    --rdzv_conf "join_timeout=$RDZV_TIMEOUT,read_timeout=$RDZV_TIMEOUT" --max_restarts "${MAX_RESTARTS:-0}" \
    -m flowers_dist train "$@" "${CPU_OVERRIDES[@]}"
