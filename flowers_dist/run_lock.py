"""The lock that keeps two live runs out of one run folder, and tells a dead holder's lock from a live one.

The main process of a run holds `<run>/.lock` (JSON: host, pid, the pid's start time, SLURM job
id, time taken) from the moment it claims the folder until it exits. A second run that finds
the lock refuses with one line, unless the holder is certainly gone:
- same host, and no process with that pid and start time exists (a killed or finished run);
- the same SLURM job id as ours: SLURM starts a requeued job only after its previous attempt ended;
- another host, and the lock's heartbeat (its mtime, touched by the holder as it trains) is
  older than `stale_after` seconds.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from .errors import ConfigError

LOCK_NAME = ".lock"


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat), None if no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int, start: str | None) -> bool:
    if Path("/proc").is_dir():
        now = _start_time(pid)
        return now is not None and (start is None or now == start)
    try:  # no /proc (not Linux): existence only
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    def __init__(self, run_dir: Path, stale_after: float = 600.0):
        self.path = run_dir / LOCK_NAME
        self.stale_after = stale_after
        self.held = False

    def _record(self) -> dict:
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "pid_start": _start_time(os.getpid()),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        }

    def holder(self) -> dict | None:
        """The current lock record, or None when there is no lock."""
        try:
            return json.loads(self.path.read_text() or "{}")
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # half-written by a holder killed mid-write: judged by its age below

    def is_stale(self, record: dict) -> bool:
        age = time.time() - self.path.stat().st_mtime if self.path.exists() else float("inf")
        if not record:
            return age > 5.0
        job = os.environ.get("SLURM_JOB_ID")
        if job and record.get("slurm_job_id") == job:
            return True
        if record.get("host") == socket.gethostname():
            return not _alive(int(record.get("pid", -1)), record.get("pid_start"))
        return age > self.stale_after

    def acquire(self) -> str | None:
        """Take the lock; returns a note when a stale lock was replaced. A live holder is a one-line ConfigError."""
        note = None
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                record = self.holder()
                if record is None:
                    continue  # released between our two looks
                if not self.is_stale(record):
                    raise ConfigError(
                        f"run folder {self.path.parent} is in use by pid {record.get('pid')} on {record.get('host')} "
                        f"(since {record.get('since')}); wait for it, or choose another train.name "
                        f"(if that run is dead, delete {self.path})"
                    ) from None
                note = f"replaced the stale lock of pid {record.get('pid')} on {record.get('host')}"
                # Only one of several contenders wins the O_EXCL create after this unlink.
                try:
                    os.replace(self.path, self.path.with_name(f"{LOCK_NAME}.stale-{os.getpid()}"))
                    os.unlink(self.path.with_name(f"{LOCK_NAME}.stale-{os.getpid()}"))
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(json.dumps(self._record()) + "\n")
            self.held = True
            return note
        raise ConfigError(
            f"run folder {self.path.parent}: could not take its lock {self.path} (another run is starting there)"
        )

    def heartbeat(self) -> None:
        """Touch the lock so that a run on another host can tell a live holder from a dead one."""
        if self.held:
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        if self.held:
            self.held = False
            try:
                record = self.holder()
                if record and record.get("pid") == os.getpid():
                    self.path.unlink()
            except OSError:
                pass
