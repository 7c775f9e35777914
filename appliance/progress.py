"""Progress of long work: a bar on a terminal, a few plain log lines elsewhere."""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger(__name__)


class Progress:
    """Report ``done`` out of ``total`` units of one task.

    On a terminal the bar is redrawn in place at most ten times a second; otherwise
    (a pipe, the journal) a log line is written at each quarter.
    """

    def __init__(self, label: str, total: int, *, in_bytes: bool = False, stream=None):
        self.label = label
        self.total = max(total, 1)
        self.in_bytes = in_bytes
        self.stream = stream if stream is not None else sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.done = 0
        self._last_draw = 0.0
        self._last_quarter = -1
        self._started = time.monotonic()

    def update(self, done: int) -> None:
        self.done = min(done, self.total)
        if self.tty:
            now = time.monotonic()
            if now - self._last_draw >= 0.1 or self.done == self.total:
                self._last_draw = now
                self._draw()
            return
        quarter = self.done * 4 // self.total
        if quarter > self._last_quarter:
            self._last_quarter = quarter
            log.info("%s: %d%%", self.label, quarter * 25)

    def advance(self, amount: int) -> None:
        self.update(self.done + amount)

    def _draw(self) -> None:
        width = 30
        filled = width * self.done // self.total
        bar = "#" * filled + "-" * (width - filled)
        if self.in_bytes:
            figures = f"{self.done / 2**20:.1f}/{self.total / 2**20:.1f} MiB"
        else:
            figures = f"{self.done}/{self.total}"
        self.stream.write(f"\r{self.label} [{bar}] {100 * self.done // self.total:3d}% {figures}")
        self.stream.flush()

    def finish(self) -> None:
        self.update(self.total)
        elapsed = time.monotonic() - self._started
        if self.tty:
            self.stream.write(f" ({elapsed:.1f} s)\n")
            self.stream.flush()
        else:
            log.info("%s: done in %.1f s", self.label, elapsed)
