"""A watchdog thread per rank: no training step finished in `timeout` seconds ends the process with EXIT_HUNG.

A rank that waits for a stopped or dead peer blocks inside a collective; the collective timeout
(train.collective_timeout) ends some such waits, but not all (a peer stopped between two
collectives, a stuck loader). The watchdog is armed by the first beat, so start-up (compiling,
downloading) is left to the collective timeout.
"""

from __future__ import annotations

import os
import sys
import threading
import time

from .errors import EXIT_HUNG


class Watchdog:
    def __init__(self, timeout: float, rank: int, what: str = "training step"):
        self.timeout, self.rank, self.what = timeout, rank, what
        self._last: float | None = None
        self._paused = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Watchdog:
        if self.timeout > 0:
            self._thread = threading.Thread(target=self._watch, name="watchdog", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()

    def beat(self) -> None:
        self._last = time.monotonic()

    def pause(self) -> _Paused:
        """A block (a final checkpoint write, closing W&B) that may legitimately take long."""
        return _Paused(self)

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.timeout / 4)):
            last = self._last
            if last is None or self._paused:
                continue
            if time.monotonic() - last > self.timeout:
                sys.stderr.write(
                    f"flowers-dist: error: rank {self.rank}: no {self.what} finished in {self.timeout:g} s; "
                    f"a rank is hung or dead (train.watchdog); exiting with code {EXIT_HUNG}\n"
                )
                sys.stderr.flush()
                os._exit(EXIT_HUNG)


class _Paused:
    def __init__(self, dog: Watchdog):
        self.dog = dog

    def __enter__(self):
        self.dog._paused += 1

    def __exit__(self, *exc):
        self.dog._paused -= 1
        self.dog.beat()
