"""Runs that the cluster interrupts: stop signals mid-epoch, hung ranks, two runs in one folder, a full disk, restarts.

Everything here happens for real: real signals to real training processes (one, or two under
`accelerate launch`), a real tmpfs that fills up, a real torchrun restart.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import (
    TINY,
    assert_same_final_weights,
    assert_whole_lines,
    cli,
    inside_epoch,
    last_checkpoint,
    metrics,
    mounted_tmpfs,
    position,
)
from procs import alive, disposition, kill, launch, stopped_at, wait_for, workers

from flowers_dist import checkpoint_file
from flowers_dist.data import dali_status
from flowers_dist.errors import EXIT_DISK, EXIT_HUNG, EXIT_PREEMPTED

# Five steps per epoch, agreement on every step, so that a signal lands mid-epoch and is acted on at the next step.
STEPS = 5
# timm's test_resnet (0.4 M parameters, BatchNorm like ResNet-18): checkpoints of 3 MB instead of 90 MB.
RUN = [
    "train",
    "--config",
    "configs/quickstart.yaml",
    *TINY,
    "model.name=test_resnet",
    f"train.max_steps_per_epoch={STEPS}",
    "train.epochs=2",
    "train.log_every=1",
    "train.stop_check_every=1",
]


def _started(records: list[dict]) -> bool:
    """A `wait_for` predicate: the run has started (set up, its loaders about to run); tests go on in slices from here."""
    return any(r["event"] == "start" for r in records)


def _position(run_dir: Path, proc: subprocess.Popen) -> tuple[int, int] | None:
    """(epoch, step inside it) of the last `step` row; asked while the run is stopped, where it is."""
    if proc.poll() is not None:
        raise AssertionError(f"the run ended (exit {proc.returncode}) before the point the test waits for")
    return position(run_dir, STEPS)


def _signal_inside_epoch(run_dir: Path, proc: subprocess.Popen, tag: str, target: int, sig: int, epoch: int) -> None:
    """Send `sig` to rank `target` so that the run stops inside `epoch`, never at or past its end.

    From its start the run goes on in slices of milliseconds (`stopped_at`) until, stopped, it is inside the
    epoch (`inside_epoch`).
    """
    wait_for(run_dir, _started, proc)
    ranks = workers(tag)
    with stopped_at(list(ranks.values()), lambda: inside_epoch(_position(run_dir, proc), epoch, STEPS)):
        os.kill(ranks[target], sig)


def _step_in_epoch(records, epoch: int, at_least: int) -> bool:
    return any(r["event"] == "step" and r["epoch"] == epoch and r["step"] - epoch * STEPS >= at_least for r in records)


@pytest.mark.e2e
@pytest.mark.parametrize(
    "loader, accum",
    [
        ("torch", 1),
        *[
            pytest.param("dali", k, marks=pytest.mark.skipif(not dali_status()[0], reason="DALI not installed"))
            for k in (1, 2)
        ],
    ],
)
def test_a_signal_mid_epoch_checkpoints_and_the_resume_is_bit_identical(tmp_path, loader, accum):
    # Inside the last epoch, after a whole epoch of DALI's reader (with accumulation, the same one pipeline:
    # its reader state is what the resume restores).
    run = [*RUN, f"data.loader={loader}", f"train.grad_accum_steps={accum}", f"train.output_dir={tmp_path}"]
    cli([*run, "train.name=full"])
    proc, tag = launch([*run, "train.name=cut"])
    try:
        _signal_inside_epoch(tmp_path / "cut", proc, tag, 0, signal.SIGUSR1, epoch=1)
        out, err = proc.communicate(timeout=300)
    finally:
        kill(proc, tag)
    assert proc.returncode == EXIT_PREEMPTED, err[-3000:]
    assert "stopped by SIGUSR1" in out
    stopped = [r for r in metrics(tmp_path / "cut") if r["event"] == "stopped"]
    assert len(stopped) == 1 and stopped[0]["epoch"] == 1 and 1 <= stopped[0]["step"] < STEPS, stopped
    state = last_checkpoint(tmp_path / "cut")
    assert state["position"] == {"epoch": stopped[0]["epoch"], "step": stopped[0]["step"]}

    # The same command again: train.resume=auto finds the checkpoint and continues from that step.
    cli([*run, "train.name=cut"])
    assert_same_final_weights(tmp_path / "full", tmp_path / "cut")
    resumed = [r for r in metrics(tmp_path / "cut") if r["event"] == "resume"]
    assert resumed and (resumed[0]["from_epoch"], resumed[0]["from_step"]) == (stopped[0]["epoch"], stopped[0]["step"])
    # The resumed epoch's record counts the whole epoch's images, both attempts together.
    epoch = [r for r in metrics(tmp_path / "cut") if r["event"] == "epoch" and r["epoch"] == stopped[0]["epoch"]]
    assert epoch[-1]["train_images"] == STEPS * 8


@pytest.mark.e2e
@pytest.mark.parametrize("epoch", [0, 1], ids=["an-earlier-epoch", "the-last-epoch"])
def test_a_signal_during_evaluation_stops_at_the_epochs_end_or_lets_the_last_epoch_finish(tmp_path, epoch):
    # After an epoch's last step the next agreement comes after evaluation: the epoch's own checkpoint is then the
    # stop checkpoint (exit 75, resume at the next epoch's start); after the last epoch there is nothing left to
    # resume, so the run ends as usual (exit 0) instead of asking for a requeue. The quickstart's 120 val photos,
    # one per batch, make evaluation (about 50 ms here) many of the test's slices long.
    run = [
        *RUN,
        "data.loader=torch",
        "data.root=data/flowers_quickstart",
        "train.eval_batch_size=1",
        f"train.output_dir={tmp_path}",
        "train.name=eval",
    ]
    proc, tag = launch(run)
    try:
        wait_for(tmp_path / "eval", _started, proc)

        def evaluating() -> bool:  # the epoch's last step done, its record (written after evaluation) not yet
            done = _position(tmp_path / "eval", proc) == (epoch, STEPS)
            assert not any(r["event"] == "epoch" and r["epoch"] == epoch for r in metrics(tmp_path / "eval")), (
                "evaluation passed unseen"
            )
            return done

        with stopped_at([proc.pid], evaluating):
            os.kill(proc.pid, signal.SIGUSR1)
        out, err = proc.communicate(timeout=300)
    finally:
        kill(proc, tag)
    events = [r["event"] for r in metrics(tmp_path / "eval")]
    if epoch == 1:
        assert proc.returncode == 0, err[-3000:]
        assert "stopped" not in events and events[-1] == "end", events
        assert last_checkpoint(tmp_path / "eval")["position"] == {"epoch": 2, "step": 0}
    else:
        assert proc.returncode == EXIT_PREEMPTED, err[-3000:]
        stopped = metrics(tmp_path / "eval")[events.index("stopped")]
        assert (stopped["epoch"], stopped["step"]) == (1, 0), stopped


@pytest.mark.e2e
def test_a_stop_signal_after_the_run_has_ended_changes_nothing(tmp_path):
    # SLURM's batch shell resends its warning every 10 s until the job step ends, so a stop signal can come once the
    # run's handler is gone, while W&B and the process group shut down: it must not turn exit 0 into death by it.
    run = [*RUN, "data.loader=torch", "train.epochs=1", f"train.output_dir={tmp_path}", "train.name=late"]
    proc, tag = launch(run)
    try:
        wait_for(tmp_path / "late", _started, proc)
        with stopped_at([proc.pid], lambda: disposition(proc.pid, signal.SIGUSR1) != "caught"):
            assert alive(proc.pid), "the process ended before the test saw its run's handler go"
            os.kill(proc.pid, signal.SIGUSR1)
        out, err = proc.communicate(timeout=120)
    finally:
        kill(proc, tag)
    assert proc.returncode == 0, (proc.returncode, err[-3000:])
    assert metrics(tmp_path / "late")[-1]["event"] == "end"


@pytest.mark.e2e
def test_sigterm_to_one_of_two_ranks_stops_both_and_the_resume_is_bit_identical(tmp_path):
    # A signal can reach some ranks and not others (a node's agent, a kubelet): the ranks agree and stop together.
    run = [*RUN, "data.loader=torch", f"train.output_dir={tmp_path}"]
    cli([*run, "train.name=full"], nprocs=2)
    proc, tag = launch([*run, "train.name=cut"], nprocs=2)
    try:
        wait_for(tmp_path / "cut", _started, proc)  # not later: from here the test follows the run in slices
        assert sorted(workers(tag)) == [0, 1], workers(tag)
        _signal_inside_epoch(tmp_path / "cut", proc, tag, 1, signal.SIGTERM, epoch=0)
        out, err = proc.communicate(timeout=300)
    finally:
        kill(proc, tag)
    assert proc.returncode != 0  # the launcher reports its workers' non-zero exit
    assert "stopped by a peer's signal" in out, out[-2000:] + err[-3000:]  # rank 0 never saw the signal itself
    stopped = [r for r in metrics(tmp_path / "cut") if r["event"] == "stopped"]
    assert len(stopped) == 1 and stopped[0]["epoch"] == 0 and 1 <= stopped[0]["step"] < STEPS, stopped
    cli([*run, "train.name=cut"], nprocs=2)
    assert_same_final_weights(tmp_path / "full", tmp_path / "cut")


@pytest.mark.e2e
def test_a_stopped_rank_ends_every_process_within_the_timeouts(tmp_path):
    timeout = 5
    run = [
        *RUN,
        "data.loader=torch",
        "train.epochs=50",
        f"train.output_dir={tmp_path}",
        "train.name=hang",
        f"train.collective_timeout={timeout}",
        f"train.watchdog={2 * timeout}",
    ]
    proc, tag = launch(run, nprocs=2)
    try:
        wait_for(tmp_path / "hang", lambda r: _step_in_epoch(r, 0, 2), proc)
        os.kill(workers(tag)[1], signal.SIGSTOP)
        stopped_at = time.time()
        # Rank 0 gives up after the collective timeout (or its watchdog); the launcher then ends the stopped
        # rank (SIGTERM, and SIGKILL after its grace period, which a stopped process needs).
        out, err = proc.communicate(timeout=timeout + 120)
        took = time.time() - stopped_at
        survivors = workers(tag)  # looked at before the clean-up below kills whatever is left
    finally:
        kill(proc, tag)
    assert proc.returncode != 0
    assert "a peer rank is hung or dead" in err or f"exiting with code {EXIT_HUNG}" in err, err[-3000:]
    assert not survivors, f"training processes outlived their launcher: {survivors}"
    print(f"stopped rank: launcher ended {took:.1f} s after SIGSTOP")


@pytest.mark.e2e
def test_two_runs_with_one_name_started_together_one_refuses(tmp_path):
    run = [
        *RUN,
        "data.loader=torch",
        "train.epochs=1",
        "train.max_steps_per_epoch=2",
        f"train.output_dir={tmp_path}",
        "train.name=same",
    ]
    first, _ = launch(run)
    second, _ = launch(run)
    results = []
    for proc in (first, second):
        out, err = proc.communicate(timeout=300)
        results.append((proc.returncode, err))
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    refusal = next(err for code, err in results if code == 2)
    lines = [line for line in refusal.splitlines() if line.startswith("flowers-dist: error:")]
    assert len(lines) == 1 and "is in use by pid" in lines[0], refusal[-2000:]
    assert [r["event"] for r in metrics(tmp_path / "same")].count("start") == 1
    assert not (tmp_path / "same" / ".lock").exists(), "the finished run left its lock behind"


def test_default_names_are_unique_and_follow_the_slurm_job(tmp_path):
    from flowers_dist.checkpointing import default_run_name

    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    names = set()
    import unittest.mock

    with unittest.mock.patch.dict(os.environ, env, clear=True):
        names = {default_run_name("quickstart") for _ in range(50)}
    assert len(names) == 50  # the same second, every name different
    with unittest.mock.patch.dict(os.environ, {**env, "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "flowers"}, clear=True):
        assert default_run_name("quickstart") == "flowers-4242"


def test_a_stale_lock_is_replaced_and_a_live_one_refuses(tmp_path):
    from flowers_dist.errors import ConfigError
    from flowers_dist.run_lock import RunLock, _start_time

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import json
        import socket

        live = {"host": socket.gethostname(), "pid": sleeper.pid, "pid_start": _start_time(sleeper.pid)}
        (tmp_path / ".lock").write_text(json.dumps(live))
        with pytest.raises(ConfigError, match=f"in use by pid {sleeper.pid}"):
            RunLock(tmp_path).acquire()
        # The same pid number with another start time is another process: the holder is gone.
        (tmp_path / ".lock").write_text(json.dumps({**live, "pid_start": "1"}))
        lock = RunLock(tmp_path)
        assert "stale lock" in lock.acquire()
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
        lock.release()
        assert not (tmp_path / ".lock").exists()
    finally:
        sleeper.kill()


MIB = 1024 * 1024


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real tmpfs of a few MiB (root only), too small for a test_resnet checkpoint (3 MB with momentum)."""
    with mounted_tmpfs(tmp_path / "disk", "2m") as mount:
        yield mount


@pytest.mark.e2e
def test_a_full_disk_during_the_first_checkpoint_is_one_line_and_the_folder_starts_again(small_tmpfs):
    run = [
        *RUN,
        "data.loader=torch",
        "train.epochs=1",
        "train.max_steps_per_epoch=2",
        f"train.output_dir={small_tmpfs}",
        "train.name=full",
    ]
    proc = cli(run, check=False)
    assert proc.returncode == EXIT_DISK, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("flowers-dist: error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "No space left on device" in errors[0] and str(small_tmpfs / "full" / "checkpoints") in errors[0]
    assert "Traceback" not in proc.stderr
    leftovers = [p.name for p in (small_tmpfs / "full" / "checkpoints").iterdir()]
    assert leftovers == [], leftovers  # the temporary file is gone, no half checkpoint under a final name
    assert_whole_lines(small_tmpfs / "full")
    # With room again, the same command starts the folder afresh (no complete checkpoint in it).
    subprocess.run(["mount", "-o", "remount,size=400m", str(small_tmpfs)], check=True)
    cli(run)
    events = [r["event"] for r in metrics(small_tmpfs / "full")]
    assert events.count("start") == 2 and events[-1] == "end"


def test_a_metrics_line_is_never_half_written_and_a_torn_one_is_dropped(small_tmpfs, capsys):
    from flowers_dist.errors import DiskError
    from flowers_dist.recorder import Recorder

    rec = Recorder(small_tmpfs, is_main=True, progress="lines")
    rec.log({"event": "start"})
    filler = small_tmpfs / "filler"
    with open(filler, "wb", buffering=0) as fh:  # fill the disk, then leave less room than one record needs
        try:
            while True:
                fh.write(b"\0" * MIB)
        except OSError:
            pass
    with open(filler, "r+b") as fh:
        fh.truncate(fh.seek(0, 2) - 8192)  # two pages: room for part of the next line, not all of it
    with pytest.raises(DiskError, match="No space left on device"):
        rec.log({"event": "step", "padding": "x" * 20000})
    assert rec.metrics_path.read_bytes().endswith(b"\n") and len(metrics(small_tmpfs)) == 1
    filler.unlink()
    # A torn last line, as a kill in the middle of a write left it before lines were written whole:
    with open(rec.metrics_path, "ab") as fh:
        fh.write(b'{"event": "step", "lo')
    rec.repair_metrics()
    rec.log({"event": "resume"})
    assert [r["event"] for r in metrics(small_tmpfs)] == ["start", "resume"]
    assert "dropped a torn last line" in capsys.readouterr().out


@pytest.mark.e2e
def test_torchrun_restarts_a_killed_rank_and_the_run_completes_from_its_checkpoint(tmp_path):
    # collective_timeout bounds the restarted attempt's init_process_group too (see below).
    run = [
        *RUN,
        "data.loader=torch",
        "train.epochs=6",
        "train.checkpoint_every_steps=2",
        "train.collective_timeout=30",
        f"train.output_dir={tmp_path}",
        "train.name=elastic",
    ]
    proc, tag = launch(run, nprocs=2, launcher="torchrun")
    try:
        wait_for(tmp_path / "elastic", lambda r: _step_in_epoch(r, 0, 4), proc)
        os.kill(workers(tag)[1], signal.SIGKILL)
        out, err = proc.communicate(timeout=300)
    finally:
        kill(proc, tag)
    # The surviving rank says what happened in one line instead of a traceback.
    assert "rank 0: a collective failed; a peer rank is hung or dead" in err, err[-3000:]
    if proc.returncode != 0:
        # torch's elastic restart can fail inside init_process_group of the new attempt: gloo connects to
        # an address left in the rendezvous store by the killed attempt ("Connection refused", or a connect
        # that waits out the timeout; seen here with torch 2.14 on both rendezvous backends, cf.
        # pytorch/pytorch#167288). The run's part is then to be resumable by the same command, as after a requeue.
        assert "Gloo connectFullMesh failed" in err or "imed out" in err, err[-3000:]
        launcher, tag = launch(run, nprocs=2, launcher="torchrun")
        try:
            out, err = launcher.communicate(timeout=300)
        finally:
            kill(launcher, tag)
        assert launcher.returncode == 0, err[-3000:]
    records = metrics(tmp_path / "elastic")
    events = [r["event"] for r in records]
    assert events.count("start") == 1 and events.count("resume") == 1 and events[-1] == "end", events
    resume = next(r for r in records if r["event"] == "resume")
    assert (resume["from_epoch"], resume["from_step"]) >= (0, 2)


@pytest.mark.e2e
def test_time_based_checkpoints_land_mid_epoch_and_only_the_newest_are_kept(tmp_path):
    # 0.0001 minutes: due at every agreement (every step here), decided by the main process's clock.
    run = [
        *RUN,
        "data.loader=torch",
        "train.checkpoint_every_minutes=0.0001",
        "train.keep_checkpoints=3",
        f"train.output_dir={tmp_path}",
        "train.name=timed",
    ]
    cli(run)
    ck = tmp_path / "timed" / "checkpoints"
    kept = sorted(p.name for p in ck.glob("step-*.pt"))
    assert kept == [f"step-{s:08d}.pt" for s in (2 * STEPS - 2, 2 * STEPS - 1, 2 * STEPS)], kept
    assert checkpoint_file.load(ck / f"step-{2 * STEPS - 1:08d}.pt")["position"] == {"epoch": 1, "step": STEPS - 1}
    assert (ck / "last.pt").samefile(ck / f"step-{2 * STEPS:08d}.pt")  # one write, two names
