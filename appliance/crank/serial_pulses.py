"""Crank detents and button presses from a microcontroller over a serial line.

The microcontroller decodes the encoder and sends one ASCII line per event (see
docs/serial-protocol.md):

    +3      three clockwise detents       (sign required, 0 to 999)
    -1      one counter-clockwise detent
    P       short press                   L    long press
    # ...   comment, ignored              (empty lines are ignored too)

Lines end with LF; a CR before it is dropped, and so are spaces and tabs around the
line. Anything else is an invalid line: skipped and counted. A line longer than
``max_line`` bytes is cut off, counted once and skipped up to its newline, so a
sender that never sends LF cannot grow memory.

A reader thread owns the port. When the adapter is unplugged it closes the port and
reopens it with backoff (1 s, doubling up to 30 s), logging each change of state once.
"""

import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass

import serial

from appliance.errors import ConfigError
# The backoff times and SERIAL_GROUP are imported so that callers can keep reading them here.
from appliance.serial_link import BACKOFF_INITIAL, BACKOFF_MAX, SERIAL_GROUP, SerialLink  # noqa: F401

log = logging.getLogger(__name__)

MIN_MAX_LINE = 8

_DETENTS = re.compile(rb"[+-][0-9]{1,3}")


@dataclass(frozen=True)
class SerialCounters:
    """Snapshot of what the serial reader has seen since it started."""

    lines: int = 0            # valid protocol lines, comments and empty lines included
    detents: int = 0          # detents passed to the queue, both directions
    presses: int = 0
    invalid_lines: int = 0
    invalid_bytes: int = 0    # bytes in invalid lines and in lines cut off by a disconnect
    overlong_lines: int = 0   # lines longer than max_line, skipped
    connects: int = 0
    disconnects: int = 0


class LineParser:
    """Split a byte stream into protocol lines and call ``on_detents``/``on_press`` for each.

    Not thread-safe: one reader feeds it.
    """

    def __init__(
        self,
        *,
        on_detents: Callable[[int], None],
        on_press: Callable[[bool], None],
        max_line: int = 256,
    ):
        if isinstance(max_line, bool) or not isinstance(max_line, int) or max_line < MIN_MAX_LINE:
            raise ConfigError(
                f"invalid [serial] max_line {max_line!r}; expected an integer >= {MIN_MAX_LINE}"
            )
        self._on_detents = on_detents
        self._on_press = on_press
        self.max_line = max_line
        self._buffer = bytearray()
        self._skipping = False
        self.counts = dict.fromkeys(
            ("lines", "detents", "presses", "invalid_lines", "invalid_bytes", "overlong_lines"), 0
        )

    def feed(self, data: bytes) -> None:
        """Parse ``data``, acting on each complete line in order."""
        start = 0
        while start < len(data):
            newline = data.find(b"\n", start)
            end = len(data) if newline < 0 else newline
            chunk = data[start:end]
            start = end + 1

            if self._skipping:
                if newline >= 0:
                    self._skipping = False
                continue
            if len(self._buffer) + len(chunk) > self.max_line:
                self.counts["overlong_lines"] += 1
                self._buffer.clear()
                self._skipping = newline < 0
                continue
            self._buffer += chunk
            if newline < 0:
                continue
            line = bytes(self._buffer)
            self._buffer.clear()
            self._handle(line)

    def reset(self) -> None:
        """Drop a partial line, as after a disconnect; its bytes count as invalid."""
        self.counts["invalid_bytes"] += len(self._buffer)
        self._buffer.clear()
        self._skipping = False

    def _handle(self, raw: bytes) -> None:
        line = raw.strip(b" \t\r")
        if not line or line.startswith(b"#"):
            self.counts["lines"] += 1
            return
        if line in (b"P", b"L"):
            self.counts["lines"] += 1
            self.counts["presses"] += 1
            self._on_press(line == b"L")
            return
        if _DETENTS.fullmatch(line):
            count = int(line)
            self.counts["lines"] += 1
            self.counts["detents"] += abs(count)
            if count:
                self._on_detents(count)
            return
        self.counts["invalid_lines"] += 1
        self.counts["invalid_bytes"] += len(raw) + 1  # the line and its LF
        log.debug("serial: skipped invalid line %r", raw[:40])


class SerialPulseSource:
    """Reader thread that feeds a CrankQueue from a serial port and survives unplugging.

    ``sleep`` is the backoff wait; it defaults to a wait that close() interrupts, and
    tests pass a fast one. The port is opened once in ``start()`` so that a missing
    permission fails at start-up; a missing device does not, because the adapter may
    be plugged in later.
    """

    def __init__(
        self,
        *,
        queue,
        port: str,
        baudrate: int = 115200,
        max_line: int = 256,
        sleep: Callable[[float], None] | None = None,
    ):
        if not port:
            raise ConfigError("[serial] port is not set; set it to the adapter's device, e.g. /dev/ttyACM0")
        if isinstance(baudrate, bool) or not isinstance(baudrate, int) or baudrate <= 0:
            raise ConfigError(f"invalid [serial] baudrate {baudrate!r}; expected a positive integer")
        self.port = port
        self.baudrate = baudrate
        self._queue = queue
        self._parser = LineParser(
            on_detents=self._put_detents, on_press=queue.put_press, max_line=max_line
        )
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._serial: serial.Serial | None = None
        self._connects = 0
        self._disconnects = 0
        self._thread: threading.Thread | None = None
        self._link = SerialLink(
            port, baudrate, label="serial port", logger=log, stop=self._stop, sleep=sleep,
            on_open=self._opened, on_data=self._feed, on_error=self._lost, on_release=self._released,
        )

    # -- control ------------------------------------------------------------------------

    def start(self) -> None:
        """Open the port if it is there and start the reader thread."""
        if self._thread is not None:
            raise RuntimeError("serial pulse source already started")
        first = self._link.open_at_start()
        self._thread = threading.Thread(
            target=self._link.run, args=(first,), name="crank-serial", daemon=True
        )
        self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the reader thread and close the port."""
        self._stop.set()
        with self._lock:
            if self._serial is not None and self._serial.is_open:
                self._serial.cancel_read()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("serial reader for %s did not stop within %.1f s", self.port, timeout)

    def wait_connected(self, timeout: float | None = None) -> bool:
        """Block until the port is open; return False if ``timeout`` passed first."""
        return self._link.connected.wait(timeout)

    @property
    def state(self) -> str:
        """One of starting, connected, disconnected, unavailable, stopped."""
        return self._link.state

    def counters(self) -> SerialCounters:
        """Return a snapshot of the reader's counters."""
        with self._lock:
            return SerialCounters(
                connects=self._connects, disconnects=self._disconnects, **self._parser.counts
            )

    # -- SerialLink callbacks: the reader thread runs them, and start() runs the first open

    def _opened(self, port: serial.Serial) -> str:
        with self._lock:
            self._serial = port
            self._connects += 1
        return ""

    def _feed(self, data: bytes) -> bool:
        if data:
            with self._lock:
                self._parser.feed(data)
        return True

    def _lost(self, port: serial.Serial, exc: Exception) -> None:
        with self._lock:
            self._disconnects += 1
        self._link.disconnected(exc)

    def _released(self, port: serial.Serial) -> None:
        with self._lock:
            self._serial = None
            self._parser.reset()

    def _put_detents(self, count: int) -> None:
        direction = 1 if count > 0 else -1
        for _ in range(abs(count)):
            self._queue.put_detent(direction)
