# shellcheck shell=bash
# Sourced by accelerate.sh, torchrun.sh and slurm.sbatch, not run: processes per node, CPU mode, the
# rendezvous timeout, and running the launcher so that stop signals reach training and its one-line error comes last.
#
# Reads  NPROC (processes on this node; default: the GPUs torch sees, or 1 without any), CPU=1 (force
#        the CPU on a GPU host), PYTHON (default python), RDZV_TIMEOUT (seconds, default 120).
# Sets   NPROC, OMP_NUM_THREADS (exported), RDZV_TIMEOUT, the array CPU_OVERRIDES to append to the train
#        arguments, and the functions error_file_init, error_file_report and run_launcher.

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
    echo "${SCRIPT_NAME:-$(basename "$0")}: NPROC must be a positive integer, got '$NPROC'" >&2
    exit 2
fi
if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
    # Launchers default to 1 thread per process; on the CPU that idles all but NPROC cores.
    OMP_NUM_THREADS=$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))
    export OMP_NUM_THREADS
fi
# Seconds the nodes may take to find each other before the launcher gives up with an error. The
# launchers' own defaults (600 s static, 600 s c10d join) print warnings every few seconds meanwhile.
RDZV_TIMEOUT=${RDZV_TIMEOUT:-120}
if ! [[ "$RDZV_TIMEOUT" =~ ^[1-9][0-9]*$ ]]; then
    echo "${SCRIPT_NAME:-$(basename "$0")}: RDZV_TIMEOUT must be a positive number of seconds, got '$RDZV_TIMEOUT'" >&2
    exit 2
fi

# check_host HOST: a one-line error (exit 2) when the rendezvous host's name does not resolve, instead
# of a launcher that retries for RDZV_TIMEOUT seconds.
check_host() {
    if ! getent hosts "$1" >/dev/null; then
        echo "${SCRIPT_NAME:-$(basename "$0")}: error: the rendezvous host '$1' does not resolve (MAIN_PROCESS_IP or the first node's name)" >&2
        exit 2
    fi
}

# error_file_init: a fresh file where the training's main process writes its one-line user error
# (flowers_dist/cli.py), exported as FLOWERS_DIST_ERROR_FILE to every process started after it.
error_file_init() {
    FLOWERS_DIST_ERROR_FILE=$(mktemp "${TMPDIR:-/tmp}/flowers-dist-error.XXXXXX")
    export FLOWERS_DIST_ERROR_FILE
}

# error_file_report: when the training wrote a one-line error, print it again as the last line (after
# the launcher's traceback) and return 0, else return 1. Removes the file either way.
error_file_report() {
    local line=""
    [[ -s "$FLOWERS_DIST_ERROR_FILE" ]] && line=$(<"$FLOWERS_DIST_ERROR_FILE")
    rm -f "$FLOWERS_DIST_ERROR_FILE"
    [[ -n "$line" ]] || return 1
    echo "$line" >&2
}

# wait_for PID: wait for a background child through trapped signals; its exit status lands in WAIT_STATUS.
wait_for() {
    WAIT_STATUS=0
    wait "$1" || WAIT_STATUS=$?
    # A trapped signal interrupts `wait` with a status > 128 while the child still runs: wait again.
    while (( WAIT_STATUS > 128 )) && kill -0 "$1" 2>/dev/null; do
        WAIT_STATUS=0
        wait "$1" || WAIT_STATUS=$?
    done
    # bash keeps a reaped child's status, so this is the child's own even if a signal came last.
    if (( WAIT_STATUS > 128 )); then
        WAIT_STATUS=0
        wait "$1" || WAIT_STATUS=$?
    fi
}

# run_launcher CMD...: run the launcher (or python itself) and exit with what the user should see:
# 2 with the training's error line last; 75 (preempted) when a SIGTERM/SIGUSR1 reached this script and
# was passed on as SIGTERM (torch's elastic agent passes SIGTERM to its workers, which checkpoint and
# stop; the agent itself then exits 1 whatever its workers returned); else the launcher's exit code.
run_launcher() {
    local pid rc stop=""
    error_file_init
    # The launcher ignores SIGUSR1 (torch's agent has no handler: the default action would kill it
    # and orphan the workers); the training processes install their own handler over the ignore.
    ( trap '' USR1; exec "$@" ) &
    pid=$!
    trap 'stop=TERM; kill -TERM "$pid" 2>/dev/null || true' TERM
    trap 'stop=USR1; kill -TERM "$pid" 2>/dev/null || true' USR1
    wait_for "$pid"
    rc=$WAIT_STATUS
    trap - TERM USR1
    if error_file_report; then
        exit 2
    fi
    if [[ -n "$stop" && "$rc" != 0 ]]; then
        echo "${SCRIPT_NAME:-$(basename "$0")}: stopped by SIG$stop; the run checkpointed and resumes with the same command (exit 75)" >&2
        exit 75
    fi
    exit "$rc"
}
