"""The crank's push button: debounced, with a short press and a long press.

The press is classified when the button is released: held for less than ``long_press``
seconds it is a short press (next prompt), otherwise a long press (new story). Deciding
on release needs no timer thread, and the time source is injectable, so tests drive a
1.5 s hold without waiting 1.5 s.

Debouncing is done here rather than by the pin driver, so it behaves the same on every
pin factory (gpiozero's MockFactory ignores ``bounce_time``). A press is accepted on
its first closing edge. A release is accepted only ``bounce`` seconds or more after
the press, and a new press only ``bounce`` seconds or more after the release. Edges
inside those windows are contact bounce and are ignored. Because every bounce burst
ends at the level it settles to, the ignored edges never leave the state wrong, except
for a glitch shorter than ``bounce``; the next edge then carries a level equal to the
believed one, which is detected and resynchronised.
"""

import logging
import threading
import time
from collections.abc import Callable

from gpiozero import InputDevice

from appliance.errors import ConfigError

log = logging.getLogger(__name__)


class CrankButton:
    """A debounced push button that reports ``on_press(long)`` once per press."""

    def __init__(
        self,
        pin: str,
        *,
        factory,
        on_press: Callable[[bool], None],
        pull_up: bool = True,
        long_press: float = 1.5,
        bounce: float = 0.02,
        clock: Callable[[], float] = time.monotonic,
    ):
        if isinstance(long_press, bool) or not isinstance(long_press, (int, float)) or long_press <= 0:
            raise ConfigError(f"invalid [crank] long_press {long_press!r}; expected seconds > 0")
        if isinstance(bounce, bool) or not isinstance(bounce, (int, float)) or not 0 <= bounce < long_press:
            raise ConfigError(
                f"invalid [crank] button_bounce {bounce!r}; expected seconds >= 0 and "
                f"below long_press ({long_press})"
            )
        self._on_press = on_press
        self._long_press = float(long_press)
        self._bounce = float(bounce)
        self._clock = clock
        self._active_level = not pull_up
        self._lock = threading.Lock()

        self._pressed = False
        self._pressed_at = 0.0
        self._released_at: float | None = None

        self._device = InputDevice(pin, pull_up=pull_up, pin_factory=factory)
        if self._device.is_active:
            # Held at start-up (or a wiring fault): wait for a release before counting.
            log.warning("button on %s is pressed at start-up; ignoring it until released", pin)
            self._pressed = True
            self._pressed_at = float("-inf")
        self._device.pin.edges = "both"
        self._device.pin.bounce_time = None
        self._device.pin.when_changed = self._changed

    def close(self) -> None:
        self._device.pin.when_changed = None
        self._device.close()

    def _changed(self, ticks: float, level: bool) -> None:
        closed = bool(level) == self._active_level
        now = self._clock()
        long = None
        with self._lock:
            if closed:
                self._closing_edge(now)
            else:
                long = self._opening_edge(now)
        if long is not None:
            self._on_press(long)

    def _closing_edge(self, now: float) -> None:
        if self._pressed:
            if now - self._pressed_at < self._bounce:
                return  # press bounce
            # A closing edge well after the press means its release was missed (a
            # glitch shorter than the bounce window): the old press cannot be timed,
            # so start timing a new one from here.
            log.debug("button: missed release, restarting press timing")
            self._pressed_at = now
            return
        if self._released_at is not None and now - self._released_at < self._bounce:
            return  # release bounce
        self._pressed = True
        self._pressed_at = now

    def _opening_edge(self, now: float) -> bool | None:
        if not self._pressed:
            return None  # bounce after a release, or the missed-release case above
        held = now - self._pressed_at
        if held < self._bounce:
            return None  # press bounce
        self._pressed = False
        self._released_at = now
        if held == float("inf"):
            return None  # the button was already held at start-up
        return held >= self._long_press
