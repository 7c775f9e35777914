"""Rotary encoder decoding: quadrature edges in, one callback per detent out.

A mechanical encoder closes two contacts, A and B, a quarter cycle apart. Read as
values (1 = contact closed, which is a low pin when pull-ups are used), turning
clockwise walks the states 00 -> 10 -> 11 -> 01 -> 00 with A as the high bit, so A
leads. Encoders differ in where the detents (the clicks) sit:

         .    .    .    .    .    .    .    .    .
    A 1       +---------+         +---------+
      0  -----+         +---------+         +-----
    B 1            +---------+         +---------+
      0  ----------+         +---------+         +
    AB   00   10   11   01   00   10   11   01   00
    full ^                   ^                   ^     4 transitions per detent
    half ^         ^         ^         ^         ^     2 transitions per detent

Full-cycle encoders rest at 00 only; half-cycle ones rest at 00 and at 11. Reading a
half-cycle encoder as a full-cycle one counts every second click, the usual "it only
moves every second click" report.

gpiozero's RotaryEncoder decodes full cycles with pull-ups, so it is used for that case.
It cannot count half cycles and always enables pull-ups, so the other cases use the
state-table decoder below, built on two gpiozero InputDevices. Neither counts through
``RotaryEncoder.steps``, whose default ``max_steps=16`` stops counting silently: each
detent is reported through a callback as it happens.
"""

import logging
import threading
from collections.abc import Callable

from gpiozero import InputDevice, RotaryEncoder

from appliance.errors import ConfigError

log = logging.getLogger(__name__)

TRANSITIONS_PER_DETENT = (4, 2)

# Quarter steps for each (previous AB, new AB), A being the high bit:
#
#               new 00   10   11   01
#     prev 00        0   +1    x   -1
#     prev 10       -1    0   +1    x
#     prev 11        x   -1    0   +1
#     prev 01       +1    x   -1    0
#
# +1 is a clockwise quarter step and -1 a counter-clockwise one. x would be both
# contacts changing at once, whose direction is unknown, so it counts 0. It cannot
# occur here, because each pin callback changes one contact. Contact bounce toggles
# one contact back and forth, which adds +1 and -1 in turn and so cancels itself
# without any time-based filter.
_CLOCKWISE_ORDER = (0b00, 0b10, 0b11, 0b01)
_QUARTER_STEPS = {
    (prev, new): {0: 0, 1: 1, 2: 0, 3: -1}[
        (_CLOCKWISE_ORDER.index(new) - _CLOCKWISE_ORDER.index(prev)) % 4
    ]
    for prev in _CLOCKWISE_ORDER
    for new in _CLOCKWISE_ORDER
}

# States where the shaft rests in a detent, by transitions per detent.
_REST_STATES = {4: frozenset({0b00}), 2: frozenset({0b00, 0b11})}


class QuadratureDecoder:
    """State-table decoder for full- or half-cycle encoders on two gpiozero InputDevices.

    The decoder sums quarter steps since the last rest state. On reaching a rest state
    it reports one detent if the sum is more than half a detent, and starts again from
    0. Because each callback changes one contact, the sum there is 0 (the shaft came
    back to the detent it left: a half detent and back, jiggle, bounce) or one full
    detent. A smaller sum only occurs after starting between two detents, and is not
    a click.
    """

    kind = "state-table"

    def __init__(
        self,
        pin_a: str,
        pin_b: str,
        *,
        factory,
        on_detent: Callable[[int], None],
        transitions_per_detent: int = 4,
        pull_up: bool = True,
        invert: bool = False,
    ):
        _check_transitions(transitions_per_detent)
        self._on_detent = on_detent
        self._transitions = transitions_per_detent
        self._rest = _REST_STATES[transitions_per_detent]
        self._sign = -1 if invert else 1
        # A contact is closed ("1") when it pulls the pin away from its resistor.
        self._active_level = not pull_up
        self._lock = threading.Lock()

        self._a = InputDevice(pin_a, pull_up=pull_up, pin_factory=factory)
        try:
            self._b = InputDevice(pin_b, pull_up=pull_up, pin_factory=factory)
        except BaseException:
            self._a.close()
            raise

        self._state = (int(self._a.is_active) << 1) | int(self._b.is_active)
        self._position = 0
        for device, callback in ((self._a, self._a_changed), (self._b, self._b_changed)):
            device.pin.edges = "both"
            device.pin.bounce_time = None
            device.pin.when_changed = callback

    def close(self) -> None:
        for device in (self._a, self._b):
            device.pin.when_changed = None
            device.close()

    # gpiozero calls these from its pin thread (lgpio) or from whoever drives a mock pin;
    # they only update two integers and may call on_detent, which must be O(1).

    def _a_changed(self, ticks: float, level: bool) -> None:
        with self._lock:
            self._advance((self._contact(level) << 1) | (self._state & 0b01))

    def _b_changed(self, ticks: float, level: bool) -> None:
        with self._lock:
            self._advance((self._state & 0b10) | self._contact(level))

    def _contact(self, level: bool) -> int:
        return int(bool(level) == self._active_level)

    def _advance(self, new_state: int) -> None:
        self._position += _QUARTER_STEPS[self._state, new_state]
        self._state = new_state
        if new_state not in self._rest:
            return
        position, self._position = self._position, 0
        if abs(position) * 2 > self._transitions:
            self._on_detent(self._sign * (1 if position > 0 else -1))


class GpiozeroEncoder:
    """gpiozero's RotaryEncoder, for full-cycle encoders wired with pull-ups."""

    kind = "gpiozero"

    def __init__(
        self,
        pin_a: str,
        pin_b: str,
        *,
        factory,
        on_detent: Callable[[int], None],
        invert: bool = False,
    ):
        sign = -1 if invert else 1
        self._on_detent = on_detent
        # max_steps=0 makes ``steps`` unbounded; it is not read here in any case.
        self._encoder = RotaryEncoder(pin_a, pin_b, max_steps=0, pin_factory=factory)
        self._encoder.when_rotated_clockwise = lambda: on_detent(sign)
        self._encoder.when_rotated_counter_clockwise = lambda: on_detent(-sign)

    def close(self) -> None:
        self._encoder.when_rotated_clockwise = None
        self._encoder.when_rotated_counter_clockwise = None
        self._encoder.close()


def open_encoder(
    pin_a: str,
    pin_b: str,
    *,
    factory,
    on_detent: Callable[[int], None],
    transitions_per_detent: int = 4,
    pull_up: bool = True,
    invert: bool = False,
) -> QuadratureDecoder | GpiozeroEncoder:
    """Open the decoder that fits the encoder: gpiozero's where it can, the state table otherwise.

    ``on_detent`` receives +1 for each clockwise detent and -1 for each
    counter-clockwise one (swapped when ``invert`` is set, for A/B wired the other way).
    """
    _check_transitions(transitions_per_detent)
    if transitions_per_detent == 4 and pull_up:
        encoder = GpiozeroEncoder(pin_a, pin_b, factory=factory, on_detent=on_detent, invert=invert)
    else:
        encoder = QuadratureDecoder(
            pin_a, pin_b, factory=factory, on_detent=on_detent,
            transitions_per_detent=transitions_per_detent, pull_up=pull_up, invert=invert,
        )
    log.debug(
        "encoder on %s/%s: %s decoder, %d transitions per detent, pull_up=%s, invert=%s",
        pin_a, pin_b, encoder.kind, transitions_per_detent, pull_up, invert,
    )
    return encoder


def _check_transitions(value: object) -> None:
    if value not in TRANSITIONS_PER_DETENT or isinstance(value, bool):
        raise ConfigError(
            f"invalid [crank] transitions_per_detent {value!r}; expected 4 (one click per "
            f"full quadrature cycle) or 2 (one click per half cycle)"
        )
