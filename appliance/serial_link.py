"""A serial port that may be unplugged: opened, read, released and reopened with backoff.

The crank's serial pulse source and the serial console both read a USB serial
adapter or gadget that can vanish and come back under the same name. SerialLink is
the reader side they share. It opens the port, translating errno values into the
project's errors, and reads until the port fails or the owner stops it. Then it
closes the port and reopens it with backoff (1 s, doubling up to 30 s). Each change
of state is logged once, at the level given for it, and repeats go to debug.
"""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Callable

import serial

from appliance.errors import ConfigError, DevicePermissionError

BACKOFF_INITIAL = 1.0
BACKOFF_MAX = 30.0
SERIAL_GROUP = "dialout"


class SerialLink:
    """The open, read, release and reopen cycle of one serial port, run by its owner's reader thread.

    ``label`` begins each log message (for example "serial port %s connected"), and
    ``logger`` is the owner's module logger, so records keep the owner's name.
    ``stop`` ends the cycle once set. ``sleep`` is the backoff wait and defaults to
    ``stop.wait``, so setting ``stop`` also ends a wait. ``open_port`` opens the port.
    Without it, ``serial.Serial`` is looked up at each open, so a test can patch it.

    The callbacks:

    - ``on_open(port)`` runs after each successful open, before ``connected`` is set.
      It returns text appended to the "connected" log message, or "".
    - ``on_data(data)`` receives every read, including the empty one that a
      cancelled read returns. It returns False to release the port.
    - ``on_error(port, exc)`` runs when a read fails and ``stop`` is not set. It
      should call ``disconnected(exc)`` to log the change of state.
    - ``on_release(port)`` runs before the port is closed.
    """

    def __init__(
        self,
        port: str,
        baudrate: int,
        *,
        label: str,
        logger: logging.Logger,
        stop: threading.Event,
        on_open: Callable[[serial.Serial], str],
        on_data: Callable[[bytes], bool],
        on_error: Callable[[serial.Serial, Exception], None],
        on_release: Callable[[serial.Serial], None],
        sleep: Callable[[float], None] | None = None,
        open_port: Callable[..., serial.Serial] | None = None,
    ):
        self.port = port
        self.baudrate = baudrate
        self.label = label
        self.connected = threading.Event()
        self.state = "stopped"  # starting, connected, disconnected, unavailable or stopped
        self._log = logger
        self._stop = stop
        self._sleep = sleep if sleep is not None else stop.wait
        self._open_port = open_port
        self._on_open = on_open
        self._on_data = on_data
        self._on_error = on_error
        self._on_release = on_release

    def open_at_start(self) -> serial.Serial | None:
        """Open the port once before the reader thread starts, so a missing permission fails early.

        Raises DevicePermissionError if the port exists but may not be opened, and
        ConfigError if pyserial rejects the settings. Returns None if the open fails
        for another reason, such as a missing port, because the adapter may be
        plugged in later and ``run`` keeps trying.
        """
        self.state = "starting"
        return self._open(initial=True)

    def run(self, port: serial.Serial | None) -> None:
        """Read ``port``, and reopen it after each failure, until ``stop`` is set.

        This is the reader thread's target. ``port`` is None if the first open failed.
        """
        delay = BACKOFF_INITIAL
        try:
            while not self._stop.is_set():
                if port is None:
                    port = self._open(initial=False)
                if port is None:
                    self._sleep(delay)
                    delay = min(delay * 2, BACKOFF_MAX)
                    continue
                delay = BACKOFF_INITIAL
                self._read(port)
                self._release(port)
                port = None
        finally:
            if port is not None:
                self._release(port)
            self._set_state("stopped", logging.INFO, "%s %s closed", self.label, self.port)

    def disconnected(self, exc: Exception) -> None:
        """Log that the port failed with ``exc`` and will be reopened."""
        self._set_state(
            "disconnected", logging.WARNING,
            "%s %s disconnected: %s; reconnecting", self.label, self.port, exc,
        )

    def _open(self, *, initial: bool) -> serial.Serial | None:
        try:
            open_port = self._open_port if self._open_port is not None else serial.Serial
            port = open_port(
                self.port, baudrate=self.baudrate, timeout=None, write_timeout=None, exclusive=True
            )
        except (serial.SerialException, OSError) as exc:
            if initial and getattr(exc, "errno", None) == errno.EACCES:
                raise DevicePermissionError(
                    f"no permission to open serial port {self.port}; add the service user "
                    f"to the {SERIAL_GROUP} group"
                ) from exc
            self._set_state(
                "unavailable", logging.WARNING,
                "%s %s unavailable (%s); retrying with backoff up to %.0f s",
                self.label, self.port, exc, BACKOFF_MAX,
            )
            return None
        except ValueError as exc:
            raise ConfigError(f"invalid [serial] settings for {self.port}: {exc}") from exc

        note = self._on_open(port)
        self.connected.set()
        self._set_state(
            "connected", logging.INFO,
            "%s %s connected at %d baud%s", self.label, self.port, self.baudrate, note,
        )
        if self._stop.is_set():
            port.cancel_read()
        return port

    def _read(self, port: serial.Serial) -> None:
        while not self._stop.is_set():
            try:
                data = port.read(1)  # blocks until a byte arrives or cancel_read()
                if data and port.in_waiting:
                    data += port.read(port.in_waiting)
            except (serial.SerialException, OSError) as exc:
                if not self._stop.is_set():
                    self._on_error(port, exc)
                return
            if not self._on_data(data):
                return

    def _release(self, port: serial.Serial) -> None:
        self.connected.clear()
        self._on_release(port)
        try:
            port.close()
        except (serial.SerialException, OSError) as exc:
            self._log.debug("%s %s: error while closing: %s", self.label, self.port, exc)

    def _set_state(self, state: str, level: int, message: str, *args) -> None:
        if state == self.state:
            self._log.debug(message, *args)
            return
        self.state = state
        self._log.log(level, message, *args)
