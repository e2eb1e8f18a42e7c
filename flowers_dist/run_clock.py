"""The run's own clock: training time that a resume continues from the checkpoint, not wall time between attempts."""

from __future__ import annotations

import time


class RunClock:
    """Seconds of the run so far, read on the host (the loop synchronises the device before it reads a figure).

    A resumed run continues from the `elapsed` its checkpoint saved, so the time spent queued or
    dead between attempts is not counted, and `time_to_target` and the epoch rows' `elapsed`
    stay one run's figures across every attempt.
    """

    def __init__(self) -> None:
        self.started = time.perf_counter()

    def continue_from(self, elapsed: float) -> None:
        """Count on from `elapsed` seconds, the run time a checkpoint saved."""
        self.started = time.perf_counter() - elapsed

    def elapsed(self) -> float:
        return time.perf_counter() - self.started
