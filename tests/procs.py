"""Finding a launch's training processes in /proc, and holding them still while a test signals them.

A signal sent "after step 2 of 5" races the run: on a fast machine the steps between the test's look at
metrics.jsonl and the signal's arrival can carry the run past the epoch (CI saw it). Stopping the processes
(SIGSTOP) makes the test's look exact: the position read while they are stopped is where they are, the
signal waits as pending until they are thawed, and the run acts on it at its next agreement. `stopped_at`
lets them run in slices of a few milliseconds between looks, so that no step (tens of milliseconds at the
tests' sizes) can pass unseen, however fast the machine.

Runs started in the background (`launch`) carry a tag in their environment, by which `workers` finds their training
processes and `kill` ends them, torchrun's included (its workers live in sessions of their own).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from conftest import REPO, cli_env, command, metrics


def launch(
    args: list[str], nprocs: int = 1, env: dict | None = None, launcher: str = "accelerate"
) -> tuple[subprocess.Popen, str]:
    """Start `flowers_dist ARGS` in the background as `conftest.cli` runs it; returns the process and its launch's tag."""
    tag = uuid.uuid4().hex
    proc = subprocess.Popen(
        command(args, nprocs, launcher),
        cwd=REPO,
        env=cli_env(nprocs, {**(env or {}), "FLOWERS_TEST_TAG": tag}),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    return proc, tag


def workers(tag: str) -> dict[int, int]:
    """rank -> pid of the training processes of one `launch`."""
    return training_pids(f"FLOWERS_TEST_TAG={tag}")


def kill(proc: subprocess.Popen, tag: str | None = None) -> None:
    """Kill a launch's process group and, by their tag, its training processes; then collect its output."""
    for pid in workers(tag).values() if tag else ():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)


def wait_for(
    run_dir: Path, predicate: Callable[[list[dict[str, Any]]], bool], proc: subprocess.Popen, timeout: float = 300
) -> list[dict[str, Any]]:
    """Poll the run's metrics.jsonl until predicate(records) holds; fail if the process ends first, or at the timeout."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(
                f"the run ended (exit {proc.returncode}) before the expected point\n{out[-2000:]}\n{err[-4000:]}"
            )
        records = metrics(run_dir)
        if predicate(records):
            return records
        time.sleep(0.05)
    kill(proc)
    raise AssertionError("timed out waiting for the run")


def training_pids(marker: str) -> dict[int, int]:
    """rank -> pid of the training processes whose environment holds `marker` ("KEY=value").

    Training processes run `python -m flowers_dist`; launchers (accelerate, torchrun), srun and bash carry the same
    environment and are left out. A process without RANK (no launcher) counts as rank 0.
    """
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        # Python running flowers_dist; not srun, bash or a launcher, whose command lines can name it too.
        if marker.encode() not in environ or not os.path.basename(cmdline[0]).startswith(b"python"):
            continue
        if b"flowers_dist" not in cmdline or any(b"accelerate" in c or b"torch.distributed.run" in c for c in cmdline):
            continue
        ranks = [e.split(b"=", 1)[1] for e in environ if e.startswith(b"RANK=")]
        found[int(ranks[0]) if ranks else 0] = int(entry.name)
    return found


def _states(pid: int) -> set[str]:
    """The scheduler state of every thread of a process ('T' = stopped); empty once it is gone."""
    states = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            # The state follows the command name, which is in parentheses and may hold spaces.
            states.add((task / "stat").read_text().rsplit(")", 1)[1].split()[0])
        except (OSError, IndexError):
            continue
    return states


@contextlib.contextmanager
def frozen(pids: list[int], timeout: float = 30) -> Iterator[None]:
    """SIGSTOP the processes and wait until every thread of each has stopped; SIGCONT them on the way out."""
    try:
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        deadline = time.time() + timeout
        # Stopped ('T'), or ended on its own meanwhile (a zombie 'Z', or gone: no threads left).
        while any(_states(pid) - {"T", "t", "Z", "X"} for pid in pids):
            if time.time() > deadline:
                raise AssertionError(f"processes {pids} did not stop within {timeout:.0f} s")
            time.sleep(0.01)
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


@contextlib.contextmanager
def stopped_at(
    pids: list[int], where: Callable[[], bool], timeout: float = 120, slice_s: float = 0.002
) -> Iterator[None]:
    """Let the processes run in slices of `slice_s` until `where()`, asked while they are stopped, holds; the block
    then runs with them still stopped, and they are thawed after it. `where` may raise to give up."""
    deadline = time.time() + timeout
    while True:
        with frozen(pids):
            if where():
                yield
                return
        if time.time() > deadline:
            raise AssertionError(f"processes {pids} never reached the point the test waits for within {timeout:.0f} s")
        time.sleep(slice_s)


def alive(pid: int) -> bool:
    """Whether the process still exists and has not ended (a zombie has)."""
    return bool(_states(pid) - {"Z", "X"})


def _signal_masks(pid: int) -> dict[str, int]:
    """The signal sets of /proc/PID/status (SigPnd, ShdPnd, SigBlk, SigIgn, SigCgt) as bit masks."""
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    fields = dict(line.partition(":")[::2] for line in lines)
    return {name: int(fields[name], 16) for name in ("SigPnd", "ShdPnd", "SigBlk", "SigIgn", "SigCgt")}


def pending(pid: int, signum: int) -> bool:
    """Whether `signum` waits, undelivered, for the (stopped) process: its shared or main-thread pending set."""
    try:
        masks = _signal_masks(pid)
    except OSError:
        return False
    return bool((masks["ShdPnd"] | masks["SigPnd"]) & 1 << (signum - 1))


def disposition(pid: int, signum: int) -> str:
    """What the process does with `signum`: "caught" (a handler), "ignored", or "default"."""
    masks, bit = _signal_masks(pid), 1 << (signum - 1)
    if masks["SigCgt"] & bit:
        return "caught"
    return "ignored" if masks["SigIgn"] & bit else "default"
