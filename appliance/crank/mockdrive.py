"""Drive gpiozero MockFactory pins the way a real crank would.

The simulator (keyboard and scripted crank) and the tests use QuadratureDriver to
produce real quadrature sequences, contact bounce and button presses on mock pins, so
the decoders under test see the same edges they would see on a Pi. Levels honour the
wiring: with pull-ups a pin idles high and a closed contact pulls it low; with
pull-downs it is the other way round.
"""

import threading
import time

from gpiozero.pins.mock import MockFactory

from appliance.crank.encoder import TRANSITIONS_PER_DETENT

# Contact states (A high bit, 1 = closed) in clockwise order; see encoder.py.
_CLOCKWISE_ORDER = (0b00, 0b10, 0b11, 0b01)

# Mock time between two bounce edges, and how long press() holds the button.
BOUNCE_EDGE_INTERVAL = 0.001
SHORT_HOLD = 0.1


class ManualClock:
    """A clock for tests and scripts: returns the time it was set to, moved by ``advance``."""

    def __init__(self, start: float = 1000.0):
        self._now = start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"cannot move a clock backwards by {seconds} s")
        with self._lock:
            self._now += seconds


class QuadratureDriver:
    """Turn, jiggle and press a crank wired to MockFactory pins.

    With a ManualClock as ``clock`` (the one the crank's button reads), holds and bounce
    intervals advance that clock and return at once. Without one, holds take real time:
    ``press()`` blocks for 0.1 s and ``long_press()`` for ``long_press`` + 0.1 s.
    Encoder edges are driven back to back in both cases, because the decoders do not
    look at time.
    """

    def __init__(
        self,
        factory: MockFactory,
        pin_a,
        pin_b,
        pin_button,
        *,
        transitions_per_detent: int = 4,
        pull_up: bool = True,
        invert: bool = False,
        clock: ManualClock | None = None,
        long_press: float = 1.5,
        button_bounce: float = 0.02,
    ):
        if not isinstance(factory, MockFactory):
            raise TypeError(f"QuadratureDriver needs a gpiozero MockFactory, not {factory!r}")
        if transitions_per_detent not in TRANSITIONS_PER_DETENT:
            raise ValueError(f"invalid transitions_per_detent {transitions_per_detent!r}; expected 4 or 2")
        # Swapped A/B wiring: the contact that leads when turning clockwise is on pin B.
        first, second = (pin_b, pin_a) if invert else (pin_a, pin_b)
        self._pin_a = factory.pin(first)
        self._pin_b = factory.pin(second)
        self._button = factory.pin(pin_button) if pin_button is not None else None
        self.transitions_per_detent = transitions_per_detent
        self._closed_level = not pull_up
        self._clock = clock
        self._long_press = long_press
        self._bounce = button_bounce
        self._index = 0  # position in _CLOCKWISE_ORDER; detents rest at index 0 (and 2 for half-cycle)

    # -- encoder ------------------------------------------------------------------------

    def turn_cw(self, n: int = 1) -> None:
        """Turn ``n`` detents clockwise."""
        for _ in range(n * self.transitions_per_detent):
            self._move(1)

    def turn_ccw(self, n: int = 1) -> None:
        """Turn ``n`` detents counter-clockwise."""
        for _ in range(n * self.transitions_per_detent):
            self._move(-1)

    def bounce(self, pin: str = "a", times: int = 3) -> None:
        """Chatter one contact ``times`` times at rest, ending where it started."""
        if pin not in ("a", "b"):
            raise ValueError(f"invalid pin {pin!r}; expected 'a' or 'b'")
        target = self._pin_a if pin == "a" else self._pin_b
        bit = 0b10 if pin == "a" else 0b01
        closed = bool(_CLOCKWISE_ORDER[self._index] & bit)
        for _ in range(times):
            self._drive(target, not closed)
            self._drive(target, closed)

    def jiggle(self) -> None:
        """Wobble the shaft a quarter step either way of the detent, without leaving it."""
        for step in (1, -1, -1, 1, 1, -1):
            self._move(step)

    def half_detent_and_back(self) -> None:
        """Turn half a detent clockwise, then back to the same detent."""
        half = self.transitions_per_detent // 2
        for _ in range(half):
            self._move(1)
        for _ in range(half):
            self._move(-1)

    # -- button -------------------------------------------------------------------------

    def press(self, *, bounces: int = 0, hold: float = SHORT_HOLD) -> None:
        """Press and release the button after ``hold`` seconds, with ``bounces`` chatters at each end."""
        if self._button is None:
            raise RuntimeError("this crank has no button pin")
        self._chatter(closed=True, bounces=bounces)
        self._wait(hold)
        self._chatter(closed=False, bounces=bounces)
        self._wait(self._bounce + BOUNCE_EDGE_INTERVAL)

    def long_press(self, *, bounces: int = 0) -> None:
        """Hold the button 0.1 s longer than the long-press time, then release it."""
        self.press(bounces=bounces, hold=self._long_press + SHORT_HOLD)

    # -- internals ----------------------------------------------------------------------

    def _move(self, step: int) -> None:
        old = _CLOCKWISE_ORDER[self._index]
        self._index = (self._index + step) % 4
        new = _CLOCKWISE_ORDER[self._index]
        # Exactly one contact changes per quarter step.
        if (old ^ new) & 0b10:
            self._drive(self._pin_a, bool(new & 0b10))
        else:
            self._drive(self._pin_b, bool(new & 0b01))

    def _chatter(self, *, closed: bool, bounces: int) -> None:
        self._drive(self._button, closed)
        for _ in range(bounces):
            self._wait(BOUNCE_EDGE_INTERVAL)
            self._drive(self._button, not closed)
            self._wait(BOUNCE_EDGE_INTERVAL)
            self._drive(self._button, closed)

    def _drive(self, pin, closed: bool) -> None:
        high = self._closed_level if closed else not self._closed_level
        if high:
            pin.drive_high()
        else:
            pin.drive_low()

    def _wait(self, seconds: float) -> None:
        if self._clock is not None:
            self._clock.advance(seconds)
        else:
            time.sleep(seconds)
