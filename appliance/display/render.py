"""The render thread: draws the latest state off the decode path.

The daemon calls ``Display.update`` after every decode step; ``update`` stores the
state and returns at once. One thread owns the panel and does everything that touches
the bus. It renders the newest state, and states that arrive faster than ``fps_max``
are replaced, so only the latest is drawn. It skips frames equal to the one on the
panel, dims and switches off an idle panel, and reconnects a panel that failed.

The thread blocks on a condition variable while there is nothing to do. Its only
timed waits are the next idle step, the frame-rate gap after a frame, and the next
reconnect attempt, so an idle box wakes at most twice in ten minutes.
"""

import logging
import math
import threading
from dataclasses import dataclass

from luma.core.error import DeviceDisplayModeError, UnsupportedPlatform
from luma.core.error import Error as LumaError

from appliance.errors import ConfigError
from appliance.display.clock import Clock, ManualClock
from appliance.display.devices import is_permission_error
from appliance.display.idle import DIM, OFF, ON, IdlePolicy
from appliance.display.layout import Layout
from appliance.display.panel import Panel
from appliance.display.state import DisplayState

__all__ = ["Display", "DisplayStats", "Backoff"]

log = logging.getLogger(__name__)

# How long close() waits for the thread to blank the panel before giving up.
_CLOSE_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class DisplayStats:
    """Counters since the display opened."""

    bytes_sent: int        # command and data bytes written to the panel's bus, init included
    frames_sent: int       # frames written to the panel, full redraws included
    frames_skipped: int    # frames not sent because the panel already showed them
    states_dropped: int    # states replaced by a newer one before they were drawn
    errors: int            # failed initialisations, writes and renders
    reconnects: int        # successful initialisations after a failure
    connected: bool        # whether the panel is initialised and its last write succeeded


class Backoff:
    """Retry delays that double from ``first`` up to ``maximum`` seconds."""

    def __init__(self, first: float = 1.0, maximum: float = 30.0):
        if not 0 < first <= maximum:
            raise ValueError(f"backoff {first}..{maximum} s is invalid: need 0 < first <= maximum")
        self.first = first
        self.maximum = maximum
        self._next = first

    def next(self) -> float:
        """Return the delay before the next attempt and double the one after."""
        delay = self._next
        self._next = min(self.maximum, self._next * 2)
        return delay

    def reset(self) -> None:
        self._next = self.first


def _is_device_failure(exc: BaseException) -> bool:
    """Return True for a failure a reconnect may cure (bus errors, missing device)."""
    if isinstance(exc, (DeviceDisplayModeError, UnsupportedPlatform)):
        return False
    return isinstance(exc, (OSError, LumaError))


def _changes_story(old: DisplayState | None, new: DisplayState) -> bool:
    """Return True when ``new`` carries a detent's worth of news over ``old``."""
    if old is None:
        return True
    return old.text != new.text or old.tokens != new.tokens or old.message != new.message


class Display:
    """Draws ``DisplayState`` updates on a panel from a thread of its own.

    Build one with ``appliance.display.open_display``. ``update`` and ``activity``
    never block on the bus. ``flush`` waits until the latest state is drawn, and
    ``close`` stops the thread and, unless ``persist``, blanks and switches off the panel.
    """

    def __init__(self, panel: Panel, layout: Layout, *, clock: Clock, fps_max: float = 10.0,
                 persist: bool = False, contrast: int = 255, idle: IdlePolicy | None = None,
                 dim_contrast: int = 16, backoff: Backoff | None = None, bus=None):
        if isinstance(fps_max, bool) or not isinstance(fps_max, (int, float)) \
                or not math.isfinite(fps_max) or not 0 < fps_max <= 1000:
            raise ConfigError(f"fps_max {fps_max!r} is invalid: use frames per second above 0, at most 1000")
        for name, value in (("contrast", contrast), ("dim_contrast", dim_contrast)):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 255:
                raise ConfigError(f"{name} {value!r} is invalid: use a whole number from 0 to 255")
        if (layout.width, layout.height) != tuple(panel.size):
            raise ConfigError(f"layout size {layout.width}x{layout.height} does not match the panel's "
                              f"{panel.size[0]}x{panel.size[1]}")

        self.layout = layout
        self.panel = panel
        self.bus = bus
        self.persist = persist
        self._clock = clock
        self._frame_gap = 1.0 / fps_max
        self._contrast = contrast
        self._dim_contrast = dim_contrast
        self._idle = idle if idle is not None else IdlePolicy()
        self._backoff = backoff if backoff is not None else Backoff()

        # Shared with callers, guarded by _cond.
        self._cond = threading.Condition()
        self._latest: DisplayState | None = None
        self._latest_seq = 0
        self._done_seq = 0
        self._taken_seq = 0    # the state the thread is drawing now
        self._urgent_seq = 0
        self._sync_requested = False
        self._last_activity = clock.now()
        self._stopping = False
        self._finished = False
        self._states_dropped = 0
        # Clock time at which the thread blocked with nothing due; None while busy.
        self._idle_at: float | None = None

        # Owned by the render thread.
        self._connected = False
        self._disabled = False
        self._retry_at = clock.now()
        self._failed_attempts = 0
        self._ever_connected = False
        self._applied_level: str | None = None
        self._panel_frame: bytes | None = None
        self._last_frame_at: float | None = None
        self._last_image = None
        self._frames_sent = 0
        self._frames_skipped = 0
        self._errors = 0
        self._reconnects = 0

        self._thread = threading.Thread(target=self._run, name="display-render", daemon=True)
        self._thread.start()

    # -- caller side -----------------------------------------------------------

    def update(self, state: DisplayState) -> None:
        """Hand the render thread a new state; the latest one wins. Never blocks on I/O."""
        if not isinstance(state, DisplayState):
            raise TypeError(f"update() takes a DisplayState, not {type(state).__name__}")
        with self._cond:
            if self._stopping:
                log.debug("display update after close ignored")
                return
            if _changes_story(self._latest, state):
                self._last_activity = self._clock.now()
            if self._latest_seq > max(self._done_seq, self._taken_seq):
                self._states_dropped += 1
            self._latest = state
            self._latest_seq += 1
            self._idle_at = None
            self._cond.notify_all()

    def activity(self) -> None:
        """Record a detent: wake the panel from dim or off and restart the idle timer."""
        with self._cond:
            self._last_activity = self._clock.now()
            self._idle_at = None
            self._cond.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until the latest state is drawn (or found unchanged) and output written.

        The frame-rate cap does not delay a flushed state. While the panel is
        unreachable the state counts as handled: it is drawn in full on reconnect.
        Returns False if ``timeout`` seconds (real time) passed first.
        """
        with self._cond:
            target = self._latest_seq
            self._urgent_seq = max(self._urgent_seq, target)
            self._sync_requested = True
            self._idle_at = None
            self._cond.notify_all()
            return self._cond.wait_for(
                lambda: self._finished or (self._done_seq >= target and not self._sync_requested), timeout)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until the render thread has done everything due at the current time.

        Meant for a ManualClock: after ``clock.advance`` this returns once the thread
        has applied the idle steps, paced frames and reconnects that fell due. With
        the system clock it returns as soon as the thread blocks. Returns False if
        ``timeout`` seconds (real time) passed first.
        """
        manual = isinstance(self._clock, ManualClock)
        with self._cond:
            return self._cond.wait_for(
                lambda: self._finished or (self._idle_at is not None
                                           and (not manual or self._idle_at == self._clock.now())), timeout)

    def close(self) -> None:
        """Stop the render thread; blank and switch off the panel unless ``persist``."""
        with self._cond:
            if self._stopping:
                return
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(_CLOSE_TIMEOUT_S)
        if self._thread.is_alive():
            log.warning("display thread did not stop within %.0f s; leaving the panel as it is",
                        _CLOSE_TIMEOUT_S)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    @property
    def stats(self) -> DisplayStats:
        """A snapshot of the display's counters."""
        with self._cond:
            dropped = self._states_dropped
        return DisplayStats(bytes_sent=self.panel.bytes_sent, frames_sent=self._frames_sent,
                            frames_skipped=self._frames_skipped, states_dropped=dropped,
                            errors=self._errors, reconnects=self._reconnects, connected=self._connected)

    @property
    def last_image(self):
        """The last frame written to the panel, or None before the first."""
        return self._last_image

    # -- render thread -----------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except Exception:
            self._errors += 1
            log.exception("display thread failed; the display stays as it is until restart")
        finally:
            with self._cond:
                self._finished = True
                self._cond.notify_all()

    def _loop(self) -> None:
        while True:
            with self._cond:
                action, argument = self._wait_for_work()
            if action == "stop":
                self._finish()
                return
            if action == "connect":
                self._connect()
            elif action == "level":
                self._apply_level(argument)
            elif action == "draw":
                self._draw(*argument)
            elif action == "sync":
                self._sync()

    def _wait_for_work(self):
        """Block until there is work; return (action, argument). Holds ``_cond``."""
        while True:
            if self._stopping:
                return "stop", None
            now = self._clock.now()
            deadlines = []
            usable = self._connected and not self._disabled

            if not self._connected and not self._disabled:
                if now >= self._retry_at:
                    return "connect", None
                deadlines.append(self._retry_at)

            idle_for = now - self._last_activity
            level = self._idle.level(idle_for)
            if usable and level != self._applied_level:
                return "level", level
            change = self._idle.next_change(idle_for)
            if change is not None:
                deadlines.append(now + change)

            if self._latest_seq > self._done_seq:
                if not usable:
                    # Nothing to draw on: the frame is redrawn whole on reconnect.
                    self._done_seq = self._latest_seq
                    self._cond.notify_all()
                    continue
                due = self._last_frame_at + self._frame_gap if self._last_frame_at is not None else now
                if self._urgent_seq >= self._latest_seq or now >= due:
                    self._taken_seq = self._latest_seq
                    return "draw", (self._latest, self._latest_seq, False)
                deadlines.append(due)
            elif self._sync_requested:
                return "sync", None

            timeout = max(0.0, min(deadlines) - now) if deadlines else None
            self._idle_at = now
            self._cond.notify_all()
            self._clock.wait(self._cond, timeout)
            self._idle_at = None

    def _connect(self) -> None:
        try:
            self.panel.open()
        except Exception as exc:  # classified below: the daemon goes on without a display
            self._connect_failed(exc)
            return

        self._connected = True
        self._backoff.reset()
        if self._failed_attempts:
            self._reconnects += 1
            log.info("display back after %d failed attempt(s)", self._failed_attempts)
        self._failed_attempts = 0
        self._ever_connected = True
        self._applied_level = None  # the init sequence left contrast and power at luma's defaults
        self._panel_frame = None
        with self._cond:
            state, seq = self._latest, self._latest_seq
        if state is not None:
            self._draw(state, seq, True)

    def _connect_failed(self, exc: BaseException) -> None:
        self._errors += 1
        self._failed_attempts += 1
        self.panel.release()
        if not _is_device_failure(exc):
            self._disabled = True
            log.error("display disabled: %s: %s; fix the [display] settings and restart",
                      type(exc).__name__, exc, exc_info=exc)
            return
        delay = self._backoff.next()
        self._retry_at = self._clock.now() + delay
        if self._failed_attempts == 1:
            hint = "; add the service user to the i2c (or spi, gpio) group" if is_permission_error(exc) else ""
            log.warning("display not reachable: %s%s; retrying in %.0f s, backing off to %.0f s",
                        exc, hint, delay, self._backoff.maximum)
        else:
            log.debug("display still not reachable (attempt %d): %s; next try in %.0f s",
                      self._failed_attempts, exc, delay)

    def _lost(self, exc: BaseException) -> None:
        """Handle a failed write on an initialised panel."""
        self._connected = False
        self._panel_frame = None
        if not _is_device_failure(exc):
            self._connect_failed(exc)
            return
        self._errors += 1
        self._failed_attempts = 1
        self.panel.release()
        delay = self._backoff.next()
        self._retry_at = self._clock.now() + delay
        log.warning("display write failed: %s; re-initialising it in %.0f s", exc, delay)

    def _apply_level(self, level: str) -> None:
        try:
            if level == OFF:
                self.panel.set_power(False)
            else:
                self.panel.set_contrast(self._dim_contrast if level == DIM else self._contrast)
                self.panel.set_power(True)
        except Exception as exc:  # any panel failure means reconnect
            self._lost(exc)
            return
        if self._applied_level is not None and level != self._applied_level:
            log.debug("display %s", {ON: "awake", DIM: "dimmed", OFF: "off"}[level])
        self._applied_level = level

    def _draw(self, state: DisplayState, seq: int, full: bool) -> None:
        try:
            image = self.layout.render(state)
        except Exception:  # a layout bug must not stop the daemon
            self._errors += 1
            log.exception("display layout failed for a state; skipping it")
            self._mark_done(seq)
            return

        frame = image.tobytes()
        if frame == self._panel_frame and not full:
            self._frames_skipped += 1
        else:
            try:
                self.panel.draw(image, state)
            except Exception as exc:  # any panel failure means reconnect
                self._lost(exc)
                self._mark_done(seq)
                return
            self._panel_frame = frame
            self._last_image = image
            self._frames_sent += 1
            self._last_frame_at = self._clock.now()
        self._mark_done(seq)

    def _mark_done(self, seq: int) -> None:
        with self._cond:
            self._done_seq = max(self._done_seq, seq)
            self._cond.notify_all()

    def _sync(self) -> None:
        try:
            self.panel.sync()
        except OSError as exc:
            self._errors += 1
            log.warning("display output could not be written: %s", exc)
        with self._cond:
            self._sync_requested = False
            self._cond.notify_all()

    def _finish(self) -> None:
        if not (self._connected and not self._disabled):
            self.panel.release()
            return
        try:
            with self._cond:
                state, seq, pending = self._latest, self._latest_seq, self._latest_seq > self._done_seq
            if self.persist:
                # Leave the final story lit: draw what is pending and wake the panel.
                if pending and state is not None:
                    self._draw(state, seq, False)
                if self._connected:
                    self._apply_level(ON)
            if self._connected:
                self.panel.shutdown(self.persist)
                log.info("display closed%s", " (picture kept)" if self.persist else "")
            else:
                self.panel.release()
        except Exception as exc:  # shutdown must finish whatever the panel does
            self._errors += 1
            log.warning("display shutdown failed: %s", exc)
            self.panel.release()
