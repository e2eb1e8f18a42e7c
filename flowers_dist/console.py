"""What a person watching the run sees: messages from the main process, and the epoch's progress bar."""

from __future__ import annotations

import sys


class Console:
    """Prints on the main process only; the other ranks' calls do nothing, so the loop needs no `if is_main`.

    The bar is tqdm's, drawn only where someone watches: `progress=bar`, or `auto` on a terminal
    (a batch job's log would fill with carriage returns). Without it the `epoch` lines say the same.
    """

    def __init__(self, is_main: bool, progress: str):
        self.is_main = is_main
        self.use_bar = is_main and (progress == "bar" or (progress == "auto" and sys.stderr.isatty()))
        self._bar = None

    def print(self, message: str) -> None:
        if self.is_main:
            print(message, flush=True)

    def epoch_bar(self, total: int, epoch: int, epochs: int) -> None:
        """A bar for one epoch of `total` optimizer steps (`epoch` is 0-based)."""
        if self.use_bar:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total, desc=f"epoch {epoch + 1}/{epochs}", unit="step", dynamic_ncols=True, leave=False
            )

    def advance(self, steps: int, loss: float | None = None, images_per_s: float | None = None) -> None:
        if self._bar is None:
            return
        self._bar.update(steps)
        if loss is not None:
            self._bar.set_postfix(
                loss=f"{loss:.3f}", img_s=f"{images_per_s:.0f}" if images_per_s else "-", refresh=False
            )

    def close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
