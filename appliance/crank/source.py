"""Open the configured crank input: encoder and button on GPIO pins, or a serial pulse source.

Both feed the same CrankQueue, so the daemon receives the same Step, Rewind and Press
events from either.
"""

import contextlib
import logging
import time
from collections.abc import Callable

from gpiozero import InputDevice
from gpiozero.pins.mock import MockFactory

from appliance.crank.button import CrankButton
from appliance.crank.encoder import open_encoder
from appliance.crank.mockdrive import ManualClock, QuadratureDriver
from appliance.crank.pins import check_pin_roles, make_pin_factory, pin_error
from appliance.crank.serial_pulses import SerialPulseSource
from appliance.errors import ConfigError

log = logging.getLogger(__name__)

SOURCES = ("gpio", "serial")


class CrankInput:
    """An open crank input; close() releases its pins, port and threads.

    ``driver`` is a QuadratureDriver when the pins are gpiozero mock pins, else None.
    ``serial`` is the SerialPulseSource for source "serial", else None.
    """

    def __init__(self, *, source: str, resources: contextlib.ExitStack, factory=None,
                 encoder=None, button=None, driver=None, serial=None):
        self.source = source
        self.factory = factory
        self.encoder = encoder
        self.button = button
        self.driver = driver
        self.serial = serial
        self._resources = resources

    def close(self) -> None:
        self._resources.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


def open_crank(
    *,
    queue,
    source: str = "gpio",
    pin_factory: str = "lgpio",
    gpiochip: int = 0,
    pin_a=None,
    pin_b=None,
    pin_button=None,
    pull_up: bool = True,
    invert: bool = False,
    transitions_per_detent: int = 4,
    long_press: float = 1.5,
    button_bounce: float = 0.02,
    serial_port: str | None = None,
    baudrate: int = 115200,
    max_line: int = 256,
    runtime_dir=None,
    factory=None,
    clock: Callable[[], float] | None = None,
    serial_sleep: Callable[[float], None] | None = None,
) -> CrankInput:
    """Open the crank input named by ``source`` and connect it to ``queue``.

    For "gpio", ``factory`` is an already built gpiozero pin factory (tests, simulator);
    without it the factory named by ``pin_factory`` is built and closed with the input.
    ``pin_button`` may be None for a crank without a button. ``clock`` times button
    presses; pass a mockdrive.ManualClock to drive long presses without waiting.
    ``serial_sleep`` replaces the serial reconnect backoff wait (tests).
    """
    if source not in SOURCES:
        raise ConfigError(f"invalid [crank] source {source!r}; expected one of {', '.join(SOURCES)}")
    if source == "serial":
        return _open_serial(queue, serial_port, baudrate, max_line, serial_sleep)
    return _open_gpio(
        queue=queue, pin_factory=pin_factory, gpiochip=gpiochip, pins={
            "pin_a": pin_a, "pin_b": pin_b, "pin_button": pin_button,
        }, pull_up=pull_up, invert=invert, transitions_per_detent=transitions_per_detent,
        long_press=long_press, button_bounce=button_bounce, runtime_dir=runtime_dir,
        factory=factory, clock=clock if clock is not None else time.monotonic,
    )


def _open_serial(queue, port, baudrate, max_line, sleep) -> CrankInput:
    reader = SerialPulseSource(queue=queue, port=port, baudrate=baudrate, max_line=max_line,
                               sleep=sleep)
    resources = contextlib.ExitStack()
    reader.start()
    resources.callback(reader.close)
    log.info("crank input: serial pulses on %s at %d baud", port, baudrate)
    return CrankInput(source="serial", resources=resources, serial=reader)


def _open_gpio(*, queue, pin_factory, gpiochip, pins, pull_up, invert, transitions_per_detent,
               long_press, button_bounce, runtime_dir, factory, clock) -> CrankInput:
    for key in ("pin_a", "pin_b"):
        if pins[key] is None:
            raise ConfigError(f"[crank] {key} is not set; set it to a GPIO such as 'GPIO17'")
    for key, value in (("pull_up", pull_up), ("invert", invert)):
        if not isinstance(value, bool):
            raise ConfigError(f"invalid [crank] {key} {value!r}; expected true or false")
    roles = {key: spec for key, spec in pins.items() if spec is not None}
    # Conflicts are checked before any factory exists, so a bad config fails fast.
    check_pin_roles(roles)

    with contextlib.ExitStack() as resources:
        if factory is None:
            factory = make_pin_factory(pin_factory, chip=gpiochip, runtime_dir=runtime_dir)
            resources.callback(factory.close)
            factory_name = pin_factory
        else:
            factory_name = type(factory).__name__
        names = check_pin_roles(roles, board=_board_of(factory))
        for role, name in names.items():
            _probe_pin(factory, name, role, pull_up)

        with _pin_errors(names, "pin_a", "pin_b"):
            encoder = open_encoder(
                names["pin_a"], names["pin_b"], factory=factory, on_detent=queue.put_detent,
                transitions_per_detent=transitions_per_detent, pull_up=pull_up, invert=invert,
            )
        resources.callback(encoder.close)

        button = None
        if "pin_button" in names:
            with _pin_errors(names, "pin_button"):
                button = CrankButton(
                    names["pin_button"], factory=factory, on_press=queue.put_press,
                    pull_up=pull_up, long_press=long_press, bounce=button_bounce, clock=clock,
                )
            resources.callback(button.close)

        driver = None
        if isinstance(factory, MockFactory):
            driver = QuadratureDriver(
                factory, names["pin_a"], names["pin_b"], names.get("pin_button"),
                transitions_per_detent=transitions_per_detent, pull_up=pull_up, invert=invert,
                clock=clock if isinstance(clock, ManualClock) else None,
                long_press=long_press, button_bounce=button_bounce,
            )

        log.info(
            "crank input: gpio via %s, encoder %s/%s (%s decoder, %d transitions per detent%s), "
            "button %s",
            factory_name, names["pin_a"], names["pin_b"], encoder.kind, transitions_per_detent,
            ", inverted" if invert else "", names.get("pin_button", "none"),
        )
        crank = CrankInput(source="gpio", resources=resources.pop_all(), factory=factory,
                           encoder=encoder, button=button, driver=driver)
    return crank


def _probe_pin(factory, name: str, role: str, pull_up: bool) -> None:
    # Claim each pin alone once, so a busy or unusable pin is reported with its role;
    # the encoder claims two pins at once and could not say which one failed.
    try:
        InputDevice(name, pull_up=pull_up, pin_factory=factory).close()
    except Exception as exc:  # translated below, or re-raised unchanged
        translated = pin_error(exc, pin=name, role=role)
        if translated is exc:
            raise
        raise translated from exc


@contextlib.contextmanager
def _pin_errors(names: dict[str, str], *roles: str):
    try:
        yield
    except Exception as exc:  # translated below, or re-raised unchanged
        pin = " or ".join(names[role] for role in roles)
        translated = pin_error(exc, pin=pin, role=", ".join(roles))
        if translated is exc:
            raise
        raise translated from exc


def _board_of(factory):
    try:
        return factory.board_info
    except Exception:  # a factory for a board gpiozero does not know: use the 40-pin header
        return None
