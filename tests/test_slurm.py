"""launch/slurm.sbatch on a real two-node SLURM cluster (tests/slurm_cluster.py): jobs of 1 and 2 processes train to
the end, preemption and the time-limit warning checkpoint, requeue and resume bit-identically, errors end clearly.

Each job trains the quickstart at TINY sizes with the PyTorch loader (it starts faster than DALI's). The cluster's
logs are part of every failure message. Times in the test docstrings were measured on a 2-core Intel Xeon shared
with other test runs, so they are rough.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, TINY, assert_same_final_weights, free_port, inside_epoch, metrics, position
from procs import alive, pending, stopped_at, training_pids
from slurm_cluster import Cluster, missing

pytestmark = [pytest.mark.slurm, pytest.mark.e2e]

# The same run for the uninterrupted job and the interrupted one, so that their weights can be compared.
# log_every=1: a `step` row per step tells the test where training is. The ranks agree on a stop after every step
# (stop_check_every=1), so a signal that reaches them inside an epoch stops the run there (_stop_inside_epoch).
# 40 sample training photos, global batch 8: 5 steps per epoch.
STEPS = 5
TRAIN = [
    "--config",
    "configs/quickstart.yaml",
    *TINY,
    "data.loader=torch",
    "train.log_every=1",
    "train.stop_check_every=1",
]
# The time-limit test holds its run until SLURM's warning arrives, so the run can be short.
ONE_PROCESS = [*TRAIN, "train.epochs=4"]
TWO_NODES = [*TRAIN, "train.epochs=4"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = missing()
    if reason:
        if os.environ.get("CI_REQUIRE_SLURM") == "1":
            pytest.fail(f"CI_REQUIRE_SLURM=1 but {reason}")
        pytest.skip(reason)
    c = Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        c.start()
        yield c
    finally:
        c.stop()


def job_env(**extra: str) -> dict[str, str]:
    """What sbatch exports to the job: this interpreter's venv first on PATH, offline W&B and hub, one thread."""
    return {
        "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}",
        "PYTHON": sys.executable,
        "WANDB_MODE": "disabled",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        **extra,
    }


def submit(
    cluster: Cluster,
    out: Path,
    name: str,
    nodes: int,
    train_args: list[str],
    sbatch_args: list[str] = (),
    per_node: int = 1,
    **env: str,
) -> int:
    """sbatch launch/slurm.sbatch on CPU nodes (`per_node` processes each); the run lands in out/runs/<name>-<job id>."""
    return cluster.sbatch(
        [
            "--nodes",
            str(nodes),
            "--ntasks-per-node",
            "1",
            "--gpus-per-node=0",
            "--cpus-per-task",
            str(per_node),
            "--job-name",
            name,
            "--output",
            str(out / "%x-%j.out"),
            *sbatch_args,
            "launch/slurm.sbatch",
            *train_args,
            f"train.output_dir={out / 'runs'}",
        ],
        env=job_env(PROCS_PER_NODE=str(per_node), **env),
        cwd=REPO,
    )


def job_out(out: Path, name: str, job_id: int) -> str:
    path = out / f"{name}-{job_id}.out"
    return path.read_text(errors="replace") if path.exists() else "(no .out)"


def explain(cluster: Cluster, out: Path, name: str, job_id: int) -> str:
    """Everything a reader needs when a job test fails: the job's .out, its state, the daemons' logs."""
    return f"--- {name}-{job_id}.out\n{job_out(out, name, job_id)[-6000:]}\n--- job\n{cluster.job(job_id)}\n{cluster.logs(25)}"


def run_and_wait(cluster, out, name, nodes, train_args, timeout=300, **env) -> tuple[int, dict, str]:
    job_id = submit(cluster, out, name, nodes, train_args, **env)
    info = cluster.wait(job_id, timeout=timeout)
    return job_id, info, explain(cluster, out, name, job_id)


@pytest.fixture(scope="module")
def one_process_run(cluster, tmp_path_factory):
    """An uninterrupted job of one process (about 60-90 s): checked by one test, the reference of another."""
    out = tmp_path_factory.mktemp("one")
    job_id, info, why = run_and_wait(cluster, out, "one", 1, ONE_PROCESS)
    return out, job_id, info, why


@pytest.fixture(scope="module")
def two_node_run(cluster, tmp_path_factory):
    """An uninterrupted job of 2 nodes x 1 process (about 60-90 s)."""
    out = tmp_path_factory.mktemp("two")
    job_id, info, why = run_and_wait(cluster, out, "two", 2, TWO_NODES)
    return out, job_id, info, why


def test_one_process_job_trains_to_the_end(one_process_run):
    out, job_id, info, why = one_process_run
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and info["Restarts"] == "0", why
    records = metrics(out / "runs" / f"one-{job_id}")  # the default run name under SLURM: job name and id
    assert records[0]["event"] == "start" and records[0]["world_size"] == 1, why
    assert records[-1]["event"] == "end", why
    assert "1 process, no launcher" in job_out(out, "one", job_id)


def test_two_node_job_trains_to_the_end(two_node_run):
    out, job_id, info, why = two_node_run
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and info["Restarts"] == "0", why
    records = metrics(out / "runs" / f"two-{job_id}")
    assert records[0]["event"] == "start" and records[0]["world_size"] == 2, why
    assert records[-1]["event"] == "end", why
    assert "2 nodes x 1 processes = 2" in job_out(out, "two", job_id)


def test_user_error_is_the_last_line_and_not_requeued(cluster, tmp_path):
    """A config error on 2 nodes (about 20-30 s): the training's one line comes last, after the launcher's traceback."""
    job_id, info, why = run_and_wait(cluster, tmp_path, "bad", 2, [*TRAIN, "train.epochs=0"])
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0" and info["Restarts"] == "0", why
    lines = job_out(tmp_path, "bad", job_id).strip().splitlines()
    assert lines[-1].startswith("flowers-dist: error: ") and "train.epochs" in lines[-1], why
    assert sum("Traceback" in line or "ChildFailedError" in line for line in lines) >= 1, (
        "no launcher traceback to come after"
    )


def test_unresolvable_head_node_fails_at_once(cluster, tmp_path):
    """MAIN_PROCESS_IP that does not resolve (NXDOMAIN from the namespace's resolver): one line, exit 2, in seconds."""
    start = time.monotonic()
    job_id, info, why = run_and_wait(
        cluster, tmp_path, "nohost", 2, TRAIN, timeout=60, MAIN_PROCESS_IP="no-such-node.invalid"
    )
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", why
    last = job_out(tmp_path, "nohost", job_id).strip().splitlines()[-1]
    assert (
        last
        == "slurm.sbatch: error: the rendezvous host 'no-such-node.invalid' does not resolve (MAIN_PROCESS_IP or the first node's name)"
    ), why
    assert time.monotonic() - start < 30, why


@pytest.mark.parametrize("script", ["accelerate.sh", "torchrun.sh"])
def test_rendezvous_that_cannot_form_ends_within_its_timeout(cluster, script):
    """One of two machines, alone (10-20 s each): the launcher gives up after RDZV_TIMEOUT with an error, not after 600 s.

    Inside the cluster's namespace, so that the launchers' host-name lookups stay on the machine. accelerate.sh runs
    as machine 1 (its store client waits for machine 0); torchrun.sh hosts the c10d store and waits for a second node.
    """
    env = {
        **job_env(RDZV_TIMEOUT="5"),
        "NUM_MACHINES": "2",
        "MACHINE_RANK": "1",
        "NPROC": "1",
        "MAIN_PROCESS_IP": "n1",
        "MAIN_PROCESS_PORT": str(free_port()),
    }
    start = time.monotonic()
    proc = cluster.run(
        ["bash", f"launch/{script}", *TRAIN, "train.epochs=1"], env=env, cwd=REPO, timeout=120, check=False
    )
    elapsed = time.monotonic() - start
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    # 5 s of waiting, plus the launcher's start (imports: up to ~20 s on a loaded 2-core host); 600 s without the timeout.
    assert elapsed < 60, f"took {elapsed:.0f} s\n{output[-3000:]}"
    expected = {
        "accelerate.sh": "has timed out after 5000ms while trying to connect to (n1,",
        "torchrun.sh": "RendezvousTimeoutError",
    }[script]
    assert expected in output, output[-3000:]


@pytest.mark.parametrize("nodes,per_node", [(2, 1), (1, 2)], ids=["2x1", "1x2"])
def test_preemption_checkpoints_requeues_and_resumes_bit_identically(cluster, two_node_run, tmp_path, nodes, per_node):
    """scancel --signal=USR1 --batch mid-epoch (about 2.5-3 min each): the job checkpoints, requeues itself, resumes,
    and ends with the weights of the uninterrupted 2-node job (world size 2 either way); its .out keeps both attempts.

    2 nodes x 1 process: the multi-node path. 1 node x 2 processes: one launcher holds both workers, so it must
    survive SIGUSR1 (the srun task ignores it) or the step ends and takes the workers with it.
    """
    ref_out, ref_id, ref_info, ref_why = two_node_run
    assert ref_info["JobState"] == "COMPLETED", ref_why
    job_id = submit(cluster, tmp_path, "pre", nodes, TWO_NODES, per_node=per_node)
    run = tmp_path / "runs" / f"pre-{job_id}"
    _stop_inside_epoch(cluster, run, job_id, workers=2)
    info = cluster.wait(job_id, timeout=400)
    why = explain(cluster, tmp_path, "pre", job_id)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and info["Restarts"] == "1", why
    _assert_preempted_then_resumed(run, job_out(tmp_path, "pre", job_id), why)
    assert_same_final_weights(ref_out / "runs" / f"two-{ref_id}", run)


def test_time_limit_warning_checkpoints_requeues_and_resumes_bit_identically(cluster, one_process_run, tmp_path):
    """--time=1 --signal=B:USR1@50 on one process (about 2 min): the warning stops the run with a checkpoint
    before the limit, the job requeues itself and, given more time, resumes to the uninterrupted job's weights.

    SLURM checks time limits every 30 s and sends the warning at the first check where less than @seconds + 30 s
    remain (measured here: @50 with --time=1 came 4 s into the job, the kill at the limit 64 s in). So with @50 the
    warning comes in the first 30 s, and the limit, 60-90 s in, leaves the run at least 20 s to checkpoint. The
    test holds the run still inside an epoch until the warning has reached it (_stop_inside_epoch), so the run
    need not be long enough to outlast SLURM's check on a fast machine. The requeued attempt would get the same
    warning: the test gives it 10 minutes (scontrol update), as a user would resubmit a run that needs more than
    one allocation.
    """
    ref_out, ref_id, ref_info, ref_why = one_process_run
    assert ref_info["JobState"] == "COMPLETED", ref_why
    job_id = cluster.sbatch(
        [
            "--nodes",
            "1",
            "--ntasks-per-node",
            "1",
            "--gpus-per-node=0",
            "--cpus-per-task",
            "1",
            "--job-name",
            "lim",
            "--output",
            str(tmp_path / "%x-%j.out"),
            "--time=1",
            "--signal=B:USR1@50",
            "launch/slurm.sbatch",
            *ONE_PROCESS,
            f"train.output_dir={tmp_path / 'runs'}",
        ],
        env=job_env(),
        cwd=REPO,
    )
    _stop_inside_epoch(cluster, tmp_path / "runs" / f"lim-{job_id}", job_id, workers=1, scancel=False)
    deadline = time.time() + 200
    while time.time() < deadline and int(cluster.job(job_id).get("Restarts", 0)) < 1:
        state = cluster.job(job_id).get("JobState")
        assert state in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED"), explain(
            cluster, tmp_path, "lim", job_id
        )
        time.sleep(0.2)
    cluster.run(["scontrol", "update", f"JobId={job_id}", "TimeLimit=10"])
    info = cluster.wait(job_id, timeout=300)
    why = explain(cluster, tmp_path, "lim", job_id)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and info["Restarts"] == "1", why
    run = tmp_path / "runs" / f"lim-{job_id}"
    _assert_preempted_then_resumed(run, job_out(tmp_path, "lim", job_id), why)
    assert_same_final_weights(ref_out / "runs" / f"one-{ref_id}", run)


def _assert_preempted_then_resumed(run: Path, out: str, why: str) -> None:
    # Both attempts' lines are in the .out (--open-mode=append), each under its header.
    assert "attempt 1 (SLURM_RESTART_COUNT=0)" in out and "attempt 2 (SLURM_RESTART_COUNT=1)" in out, why
    first = out[out.index("attempt 1 (SLURM_RESTART_COUNT=0)") : out.index("attempt 2 (SLURM_RESTART_COUNT=1)")]
    assert "SIGUSR1 received" in first and "requeueing" in first, why
    # The launcher outlived the signal (it ignores SIGUSR1): srun reports its exit, not its death by the signal,
    # which would leave the workers to finish their checkpoint before slurmstepd kills the step (KillWait).
    assert "User defined signal 1" not in first, why
    records = metrics(run)
    events = [r["event"] for r in records]
    assert (
        events.count("start") == 1
        and events.count("stopped") == 1
        and events.count("resume") == 1
        and events[-1] == "end"
    ), events
    stopped, resume = records[events.index("stopped")], records[events.index("resume")]
    assert stopped["signal"] == "SIGUSR1", stopped
    # The next attempt continued from the very step where the first one stopped, inside an epoch.
    assert (resume["from_epoch"], resume["from_step"]) == (stopped["epoch"], stopped["step"]), (stopped, resume)
    assert stopped["step"] > 0, stopped


def _stop_inside_epoch(
    cluster: Cluster, run: Path, job_id: int, workers: int, scancel: bool = True, timeout: float = 180
) -> None:
    """Have SIGUSR1 reach the job's training processes while they are inside the first epoch, for certain.

    The signal travels batch shell -> scancel -> slurmstepd -> workers, long enough for several steps, and
    SLURM's time-limit warning comes at its own 30 s check. So from the run's start the workers go on in slices
    of milliseconds (`stopped_at`) until, stopped, they are inside the first epoch (`inside_epoch`). With
    `scancel` the test then sends the signal; without, SLURM's warning does, and the stopped run cannot end
    before it comes. The workers are thawed once SIGUSR1 is pending in each (the batch shell resends it every
    10 s until the job step ends, so it comes even if an earlier one arrived before their handler was
    installed). They agree after every step, so they stop at that step, or the next if its agreement had begun.
    """
    deadline = time.time() + timeout
    while not ((run / "metrics.jsonl").exists() and any(r["event"] == "start" for r in metrics(run))):
        state = cluster.job(job_id).get("JobState")
        assert time.time() < deadline and state in ("PENDING", "RUNNING", "CONFIGURING"), (
            f"the job never started its run\n{cluster.job(job_id)}"
        )
        time.sleep(0.05)
    pids = list(training_pids(f"SLURM_JOB_ID={job_id}").values())
    assert len(pids) == workers, f"expected the job's {workers} training processes, found {pids}"

    def inside() -> bool:
        assert all(alive(pid) for pid in pids), "the training processes ended before the test caught them"
        return inside_epoch(position(run, STEPS), 0, STEPS)

    with stopped_at(pids, inside, timeout=timeout):
        if scancel:
            cluster.run(["scancel", "--signal=USR1", "--batch", str(job_id)])
        while not all(pending(pid, signal.SIGUSR1) for pid in pids):
            assert time.time() < deadline, f"SIGUSR1 never reached the stopped workers {pids}\n{cluster.job(job_id)}"
            time.sleep(0.05)
