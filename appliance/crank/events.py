"""Crank events and the queue between the input callbacks and the daemon's worker.

Input callbacks (gpiozero's pin thread, the serial reader) only call ``put_*``, which
records the detent or press in constant time under a lock. The worker calls ``get()``,
which blocks on a Condition and hands out one decode step, rewind or press at a time.
Detents are stored as counts, not as one object each, so a fast crank costs no memory
beyond ``max_backlog`` and a reverse detent can still cancel forward detents that the
worker has not taken yet.

Every detent received ends in exactly one counter of ``CrankCounters``:

    received == generated + rewound + cancelled + dropped + ignored + pending + partial
"""

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from appliance.errors import ConfigError

log = logging.getLogger(__name__)

REVERSE_POLICIES = ("rewind", "ignore", "generate")

# Seconds between two warnings about dropped detents; the count in between is summed.
DROP_LOG_INTERVAL = 10.0


@dataclass(frozen=True)
class Step:
    """Request to decode ``tokens`` tokens now."""

    tokens: int


@dataclass(frozen=True)
class Rewind:
    """Request to un-generate the last ``tokens`` tokens."""

    tokens: int


@dataclass(frozen=True)
class Press:
    """A button press: short means next prompt, long means new story."""

    long: bool


@dataclass(frozen=True)
class CrankCounters:
    """Snapshot of the queue's detent accounting; every field except the last two counts detents.

    ``cancelled`` counts both detents of each pair that cancelled out (a pending forward
    detent and the reverse detent that removed it, or the reverse way round for a
    partial rewind group). ``pending`` is detents in complete groups not yet taken by
    the worker, ``partial`` detents still waiting for ``detents_per_token``.
    ``backlog_peak`` is the largest number of stored detents (pending + partial) seen,
    and ``presses`` the number of button presses received.
    """

    received: int = 0
    generated: int = 0
    rewound: int = 0
    cancelled: int = 0
    dropped: int = 0
    ignored: int = 0
    pending: int = 0
    partial: int = 0
    backlog_peak: int = 0
    presses: int = 0

    def unaccounted(self) -> int:
        """Return received detents missing from every other counter; 0 when the books balance."""
        accounted = (
            self.generated + self.rewound + self.cancelled + self.dropped
            + self.ignored + self.pending + self.partial
        )
        return self.received - accounted


class _DetentRun:
    """Detents received between two other inbox items, as counts.

    Rewinds come before forward detents within a run: a reverse detent arriving while
    forward detents are pending cancels one of them instead of queueing behind them.
    """

    __slots__ = ("reverse", "forward")

    def __init__(self, reverse: int = 0, forward: int = 0):
        self.reverse = reverse
        self.forward = forward


class CrankQueue:
    """Thread-safe inbox of detents, presses and other events for the daemon's worker.

    ``detents_per_token`` detents make one group, which becomes one Step (forward) or
    one Rewind (reverse) of ``tokens_per_detent`` tokens. At most one of the two may be
    above 1. ``reverse`` sets what a counter-clockwise detent does: "rewind" (undo
    tokens), "ignore" (count it and do nothing) or "generate" (same as clockwise).
    """

    def __init__(
        self,
        *,
        max_backlog: int = 64,
        detents_per_token: int = 1,
        tokens_per_detent: int = 1,
        reverse: str = "rewind",
        clock: Callable[[], float] = time.monotonic,
    ):
        _check_positive_int("max_backlog", max_backlog)
        _check_positive_int("detents_per_token", detents_per_token)
        _check_positive_int("tokens_per_detent", tokens_per_detent)
        if detents_per_token > 1 and tokens_per_detent > 1:
            raise ConfigError(
                f"[crank] detents_per_token = {detents_per_token} and tokens_per_detent = "
                f"{tokens_per_detent} cannot both be above 1; set one of them to 1"
            )
        if reverse not in REVERSE_POLICIES:
            raise ConfigError(
                f"invalid [crank] reverse {reverse!r}; expected one of {', '.join(REVERSE_POLICIES)}"
            )

        self.max_backlog = max_backlog
        self.group = detents_per_token
        self.tokens = tokens_per_detent
        self.reverse = reverse
        self._clock = clock

        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._inbox: collections.deque[_DetentRun | Press | object] = collections.deque()
        self._stored = 0
        self._closed = False
        self._counts = dict.fromkeys(
            ("received", "generated", "rewound", "cancelled", "dropped", "ignored",
             "backlog_peak", "presses"),
            0,
        )
        self._drops_unlogged = 0
        self._drop_logged_at: float | None = None

    # -- producers (callback threads) ------------------------------------------------

    def put_detent(self, direction: int) -> None:
        """Record one detent: +1 clockwise, -1 counter-clockwise."""
        if direction not in (1, -1):
            raise ValueError(f"invalid detent direction {direction!r}; expected +1 or -1")

        with self._lock:
            if self._closed:
                return
            self._counts["received"] += 1
            if direction < 0 and self.reverse == "ignore":
                self._counts["ignored"] += 1
                return
            if direction < 0 and self.reverse == "generate":
                direction = 1

            run = self._tail_run()
            if direction > 0:
                accepted = self._put_forward(run)
            else:
                accepted = self._put_reverse(run)
            if accepted:
                self._counts["backlog_peak"] = max(self._counts["backlog_peak"], self._stored)
                if self._deliverable():
                    self._ready.notify()
                return

            self._counts["dropped"] += 1
            self._drops_unlogged += 1
            message = self._drop_message()

        if message:
            log.warning("%s", message)

    def put_press(self, long: bool) -> None:
        """Record a button press; it is delivered after the detents received before it."""
        with self._lock:
            if self._closed:
                return
            self._counts["presses"] += 1
            self._append_item(Press(long=bool(long)))

    def put_event(self, event: object) -> None:
        """Record any other inbox item, delivered in order with detents and presses."""
        if event is None or isinstance(event, _DetentRun):
            raise ValueError(f"invalid inbox event {event!r}")
        with self._lock:
            if self._closed:
                return
            self._append_item(event)

    # -- consumer (the worker) --------------------------------------------------------

    def get(self, timeout: float | None = None) -> Step | Rewind | Press | object | None:
        """Return the next Step, Rewind, Press or event, blocking until one is ready.

        Returns None when ``timeout`` seconds pass first, or once the queue is closed.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while True:
                if self._closed:
                    return None
                item = self._take()
                if item is not None:
                    return item
                if deadline is None:
                    self._ready.wait()
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._ready.wait(remaining)

    def counters(self) -> CrankCounters:
        """Return a consistent snapshot of the detent accounting."""
        with self._lock:
            partial = 0
            if self._inbox and isinstance(self._inbox[-1], _DetentRun):
                tail = self._inbox[-1]
                partial = tail.reverse % self.group + tail.forward % self.group
            return CrankCounters(
                pending=self._stored - partial, partial=partial, **self._counts
            )

    def close(self) -> None:
        """Close the queue: wake every get() with None and ignore later puts."""
        with self._lock:
            self._closed = True
            self._ready.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed

    # -- internals, called with the lock held -----------------------------------------

    def _tail_run(self) -> _DetentRun:
        if self._inbox and isinstance(self._inbox[-1], _DetentRun):
            return self._inbox[-1]
        run = _DetentRun()
        self._inbox.append(run)
        return run

    def _put_forward(self, run: _DetentRun) -> bool:
        # A forward detent first cancels a reverse detent of an unfinished rewind
        # group, so jiggling the crank inside one group never rewinds anything.
        if run.reverse % self.group:
            run.reverse -= 1
            self._stored -= 1
            self._counts["cancelled"] += 2
            return True
        if self._stored >= self.max_backlog:
            return False
        run.forward += 1
        self._stored += 1
        return True

    def _put_reverse(self, run: _DetentRun) -> bool:
        if run.forward:
            run.forward -= 1
            self._stored -= 1
            self._counts["cancelled"] += 2
            return True
        if self._stored >= self.max_backlog:
            return False
        run.reverse += 1
        self._stored += 1
        return True

    def _append_item(self, item: object) -> None:
        # Whole groups stay before the new item and an unfinished group moves after
        # it. The crank's partial progress so survives a press, and cannot block the
        # inbox in front of it.
        carry = None
        if self._inbox and isinstance(self._inbox[-1], _DetentRun):
            tail = self._inbox[-1]
            carry = _DetentRun(tail.reverse % self.group, tail.forward % self.group)
            tail.reverse -= carry.reverse
            tail.forward -= carry.forward
            if not (tail.reverse or tail.forward):
                self._inbox.pop()
        self._inbox.append(item)
        if carry is not None and (carry.reverse or carry.forward):
            self._inbox.append(carry)
        self._ready.notify()

    def _deliverable(self) -> bool:
        head = self._inbox[0]
        if not isinstance(head, _DetentRun):
            return True
        return head.reverse >= self.group or head.forward >= self.group or len(self._inbox) > 1

    def _take(self) -> Step | Rewind | Press | object | None:
        while self._inbox:
            head = self._inbox[0]
            if not isinstance(head, _DetentRun):
                return self._inbox.popleft()
            if head.reverse >= self.group:
                head.reverse -= self.group
                self._stored -= self.group
                self._counts["rewound"] += self.group
                self._drop_empty_head(head)
                return Rewind(tokens=self.tokens)
            if head.forward >= self.group:
                head.forward -= self.group
                self._stored -= self.group
                self._counts["generated"] += self.group
                self._drop_empty_head(head)
                return Step(tokens=self.tokens)
            if head.reverse or head.forward:
                return None  # an unfinished group in the tail run: wait for more detents
            self._inbox.popleft()
        return None

    def _drop_empty_head(self, head: _DetentRun) -> None:
        if not (head.reverse or head.forward) and len(self._inbox) > 1:
            self._inbox.popleft()

    def _drop_message(self) -> str | None:
        now = self._clock()
        if self._drop_logged_at is not None and now - self._drop_logged_at < DROP_LOG_INTERVAL:
            return None
        self._drop_logged_at = now
        dropped, self._drops_unlogged = self._drops_unlogged, 0
        return (
            f"crank backlog full ({self.max_backlog} detents): dropped {dropped} "
            f"detent(s), {self._counts['dropped']} in total"
        )


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"invalid [crank] {name} {value!r}; expected an integer >= 1")


__all__ = ["CrankCounters", "CrankQueue", "Press", "Rewind", "Step", "REVERSE_POLICIES"]
