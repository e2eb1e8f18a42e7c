"""Stop signals: SIGUSR1 and SIGTERM (what SLURM and Kubernetes send before they kill) become a flag the loop acts on.

The handler only records the signal; the loop finishes its step, the ranks agree (a signal can
reach some ranks and not others), and together they write a checkpoint and exit with
EXIT_PREEMPTED. A second signal changes nothing: the launcher's own SIGKILL ends a run that
takes too long to stop.
"""

from __future__ import annotations

import signal
import time

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


def ignore_stop_signals() -> None:
    """Ignore the stop signals in this process (its own choice, for the time outside a run's StopSignals)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class StopSignals:
    def __init__(self) -> None:
        self.received: str | None = None
        self.at: float | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        for sig in STOP_SIGNALS:
            # Replaces SIG_IGN too: launch scripts make launchers ignore SIGUSR1 (their default action would
            # kill them), and the training processes inherit that disposition.
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name
            self.at = time.time()

    @property
    def requested(self) -> bool:
        return self.received is not None
