"""Clocks for the render thread: the monotonic system clock, or a manual one for tests.

The render thread waits on a ``threading.Condition`` for new states and, with a
timeout, for its own deadlines (dim, off, reconnect). A clock supplies both the
time and that wait, so a test can move time forward without sleeping.
"""

import threading
import time
from typing import Callable, Protocol, runtime_checkable

__all__ = ["Clock", "SystemClock", "ManualClock", "as_clock"]


@runtime_checkable
class Clock(Protocol):
    """A source of seconds plus a way to wait on a condition until a deadline."""

    def now(self) -> float:
        """Return the current time in seconds."""

    def wait(self, condition: threading.Condition, timeout: float | None) -> None:
        """Wait on ``condition`` (held by the caller) for a notify or ``timeout`` seconds."""


class SystemClock:
    """Time from a callable (``time.monotonic`` by default) and real timed waits."""

    def __init__(self, source: Callable[[], float] = time.monotonic):
        self._source = source

    def now(self) -> float:
        return self._source()

    def wait(self, condition: threading.Condition, timeout: float | None) -> None:
        condition.wait(timeout)


class ManualClock:
    """A clock that moves only when ``advance`` is called.

    A thread waiting through ``wait`` ignores its timeout and sleeps until notified
    or until ``advance`` moves the time, so tests with deadlines never sleep.
    """

    def __init__(self, start: float = 0.0):
        self._time = start
        self._lock = threading.Lock()
        self._waiting: set[threading.Condition] = set()

    def now(self) -> float:
        with self._lock:
            return self._time

    def __call__(self) -> float:
        return self.now()

    def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds`` and wake every thread waiting on it."""
        if seconds < 0:
            raise ValueError(f"cannot move a clock back by {seconds} s")
        with self._lock:
            self._time += seconds
            waiting = list(self._waiting)
        for condition in waiting:
            with condition:
                condition.notify_all()

    def wait(self, condition: threading.Condition, timeout: float | None) -> None:
        with self._lock:
            self._waiting.add(condition)
        try:
            condition.wait()
        finally:
            with self._lock:
                self._waiting.discard(condition)


def as_clock(clock) -> Clock:
    """Return ``clock`` as a ``Clock``: a Clock as is, a bare callable wrapped."""
    if isinstance(clock, Clock):
        return clock
    if callable(clock):
        return SystemClock(clock)
    raise TypeError(f"clock must be a Clock or a callable returning seconds, not {type(clock).__name__}")
