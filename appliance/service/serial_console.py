"""Serial console: prompts typed on a serial line, and the story mirrored back to it.

With ``[serial] mode = "console"``, a terminal, another computer, a teletype or a
receipt printer on a UART or USB serial gadget follows the story as it is cranked:

- Input: a line of at most ``max_line`` bytes, ended by CR, LF or CRLF, becomes the
  next prompt (a PromptRequest). Backspace and DEL erase the last character, as
  in a terminal. Empty lines are ignored; longer lines are discarded and counted.
- Output: every piece of generated text as it is decoded. A rewind erases the
  removed characters with backspace-space-backspace, or writes ``rewind_marker``.
  A story starts with a header line that contains its prompt and ends with a
  footer line.

Two threads own the port. The reader opens it, reads prompts and reopens it with
backoff (1 s doubling to 30 s) after an unplug, logging each change of state once.
The writer sends the output from a bounded buffer. The Mirror methods, called on
the daemon's worker thread, only append to that buffer: while the port is
unplugged or the buffer is full, the output is dropped and counted instead.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import serial

from appliance.errors import ConfigError, ControlError
# The backoff times and SERIAL_GROUP are imported so that callers can keep reading them here.
from appliance.serial_link import BACKOFF_INITIAL, BACKOFF_MAX, SERIAL_GROUP, SerialLink  # noqa: F401
from appliance.service.control import display_width, printable, validate_prompt
from appliance.service.daemon import PromptRequest

log = logging.getLogger(__name__)

MIN_MAX_LINE = 16
# Output waiting for the port. At 9600 baud this is about 17 s of text, far more
# than a hand-cranked story produces in that time.
OUTPUT_BUFFER_BYTES = 16 * 1024
NEWLINES = ("\r\n", "\n", "\r")
# Written on a rewind that backspaces cannot erase (it removes a line break or a tab).
FALLBACK_REWIND_MARKER = "\n[rewound {count} characters]\n"

_WRITE_CHUNK = 1024
_BACKSPACE = (0x08, 0x7F)
_LINE_ENDS = (0x0A, 0x0D)


@dataclass(frozen=True)
class ConsoleCounters:
    """Snapshot of the console's traffic since it started."""

    prompts: int = 0            # lines posted as prompts
    overlong_lines: int = 0     # lines longer than max_line, discarded
    invalid_lines: int = 0      # lines rejected as prompts (control characters, too long)
    bytes_written: int = 0
    bytes_dropped: int = 0      # output lost while unplugged, or with the buffer full
    connects: int = 0
    disconnects: int = 0


class PromptLineReader:
    """Split serial input into prompt lines and call ``on_line`` with each decoded line.

    Not thread-safe: one reader feeds it. CR and LF never occur inside a multi-byte
    UTF-8 sequence, so lines are split on bytes, and a character split across two
    reads is joined before its line is decoded. Invalid bytes become U+FFFD.
    """

    def __init__(self, *, max_line: int, on_line: Callable[[str], None], on_overlong: Callable[[], None]):
        self.max_line = max_line
        self._on_line = on_line
        self._on_overlong = on_overlong
        self._buffer = bytearray()
        self._skipping = False

    def feed(self, data: bytes) -> None:
        for byte in data:
            if byte in _LINE_ENDS:
                self._end_line()
            elif self._skipping:
                continue
            elif byte in _BACKSPACE:
                self._erase()
            elif len(self._buffer) >= self.max_line:
                self._buffer.clear()
                self._skipping = True
                self._on_overlong()
            else:
                self._buffer.append(byte)

    def reset(self) -> None:
        """Drop a partial line, as after a disconnect."""
        self._buffer.clear()
        self._skipping = False

    def _end_line(self) -> None:
        if self._skipping:
            self._skipping = False
            return
        line = self._buffer.decode("utf-8", "replace").strip()
        self._buffer.clear()
        if line:
            self._on_line(line)

    def _erase(self) -> None:
        # Remove one whole UTF-8 character: its continuation bytes, then its lead byte.
        while self._buffer and self._buffer[-1] & 0xC0 == 0x80:
            self._buffer.pop()
        if self._buffer:
            self._buffer.pop()


class SerialConsole:
    """Read prompts from a serial port and mirror the story to it; survives unplugging.

    ``post`` takes the PromptRequest for each prompt line. ``open_port`` opens the
    port (pyserial's Serial by default) and ``sleep`` is the backoff wait, which
    close() interrupts; tests pass fast ones. ``newline`` replaces each line break
    written. ``rewind_marker``, if set, is written on a rewind in place of
    backspaces, with ``{count}`` replaced by the number of characters removed.
    """

    def __init__(
        self,
        port: str,
        baudrate: int = 115200,
        *,
        post: Callable[[object], None],
        max_line: int = 256,
        newline: str = "\r\n",
        rewind_marker: str | None = None,
        buffer_size: int = OUTPUT_BUFFER_BYTES,
        open_port: Callable[..., serial.Serial] = serial.Serial,
        sleep: Callable[[float], None] | None = None,
    ):
        if not port:
            raise ConfigError("[serial] port is not set; set it to the console's device, e.g. /dev/ttyGS0")
        if isinstance(baudrate, bool) or not isinstance(baudrate, int) or baudrate <= 0:
            raise ConfigError(f"invalid [serial] baudrate {baudrate!r}; expected a positive integer")
        if isinstance(max_line, bool) or not isinstance(max_line, int) or max_line < MIN_MAX_LINE:
            raise ConfigError(f"invalid [serial] max_line {max_line!r}; expected an integer >= {MIN_MAX_LINE}")
        if newline not in NEWLINES:
            raise ConfigError(f"invalid serial console newline {newline!r}; expected CR LF, LF or CR")
        if isinstance(buffer_size, bool) or not isinstance(buffer_size, int) or buffer_size < _WRITE_CHUNK:
            raise ConfigError(f"invalid serial console buffer_size {buffer_size!r}; expected an integer >= {_WRITE_CHUNK}")
        if rewind_marker is not None:
            _check_marker(rewind_marker)

        self.port = port
        self.baudrate = baudrate
        self.max_line = max_line
        self.newline = newline
        self.rewind_marker = rewind_marker
        self.buffer_size = buffer_size
        self._post = post
        self._stop = threading.Event()
        self._lines = PromptLineReader(
            max_line=max_line, on_line=self._prompt_line, on_overlong=self._overlong_line
        )

        # The condition guards the port hand-over between the two threads, the
        # output buffer the worker thread fills, and the counters.
        self._cond = threading.Condition()
        self._serial: serial.Serial | None = None
        self._failed = False        # the writer saw the port fail; the reader releases it
        self._writing = False       # the writer is inside port.write()
        self._out = bytearray()
        self._overflowing = False
        self._at_line_start = True
        self._story_id: int | None = None
        self._counts = dict.fromkeys(
            ("prompts", "overlong_lines", "invalid_lines", "bytes_written", "bytes_dropped",
             "connects", "disconnects"),
            0,
        )
        self._dropped_at_disconnect = 0
        self._reader: threading.Thread | None = None
        self._writer: threading.Thread | None = None
        self._link = SerialLink(
            port, baudrate, label="serial console", logger=log, stop=self._stop, sleep=sleep,
            open_port=open_port, on_open=self._opened, on_data=self._take_input,
            on_error=self._lost, on_release=self._released,
        )

    # -- control --------------------------------------------------------------------------

    def start(self) -> None:
        """Open the port if it is there and start the reader and writer threads.

        Raises DevicePermissionError if the port exists but may not be opened. A
        missing port is retried in the background, because it may be plugged in later.
        """
        if self._reader is not None:
            raise RuntimeError("serial console already started")
        first = self._link.open_at_start()
        self._writer = threading.Thread(target=self._write_loop, name="serial-console-out", daemon=True)
        self._reader = threading.Thread(target=self._link.run, args=(first,), name="serial-console", daemon=True)
        self._writer.start()
        self._reader.start()

    def close(self, timeout: float = 5.0) -> None:
        """Stop both threads and close the port; output not yet written is discarded."""
        self._stop.set()
        with self._cond:
            port = self._serial
            self._cond.notify_all()
        if port is not None:
            _cancel(port)
        for thread in (self._reader, self._writer):
            if thread is not None and thread is not threading.current_thread():
                thread.join(timeout)
                if thread.is_alive():
                    log.warning("serial console thread %s did not stop within %.1f s", thread.name, timeout)

    def wait_connected(self, timeout: float | None = None) -> bool:
        """Block until the port is open; return False if ``timeout`` passed first."""
        return self._link.connected.wait(timeout)

    @property
    def state(self) -> str:
        """One of starting, connected, disconnected, unavailable, stopped."""
        return self._link.state

    def counters(self) -> ConsoleCounters:
        """Return a snapshot of the console's counters."""
        with self._cond:
            return ConsoleCounters(**self._counts)

    # -- Mirror: called on the worker thread -----------------------------------------------
    # These hold the lock briefly and never touch the port; only a buffer overflow logs.

    def story_started(self, story_id: int, prompt: str) -> None:
        one_line = " ".join(prompt.split())
        with self._cond:
            self._story_id = story_id
        self._emit_line(f"--- story {story_id}: {printable(one_line)} ---")

    def text_added(self, text: str) -> None:
        self._emit(printable(text))

    def text_removed(self, text: str) -> None:
        if self.rewind_marker is not None:
            self._emit(self.rewind_marker.format(count=len(text)))
        elif "\n" in text or "\t" in text:
            # Backspace cannot move up a line, and a tab's width depends on the column.
            self._emit(FALLBACK_REWIND_MARKER.format(count=len(text)))
        else:
            self._emit("\b \b" * display_width(printable(text)))

    def story_ended(self, reason: str) -> None:
        with self._cond:
            story_id = self._story_id
        self._emit_line(f"--- end of story {story_id} ({reason}) ---")

    def _emit_line(self, line: str) -> None:
        with self._cond:
            prefix = "" if self._at_line_start else "\n"
        self._emit(prefix + line + "\n")

    def _emit(self, text: str) -> None:
        if not text:
            return
        data = text.replace("\n", self.newline).encode("utf-8")
        message = None
        with self._cond:
            self._at_line_start = text.endswith("\n")
            if self._serial is None or self._failed:
                self._counts["bytes_dropped"] += len(data)
                self._dropped_at_disconnect += len(data)
            elif len(self._out) + len(data) > self.buffer_size:
                self._counts["bytes_dropped"] += len(data)
                if not self._overflowing:
                    self._overflowing = True
                    message = "serial console %s: output buffer full (%d bytes); dropping text until the port catches up"
            else:
                self._out += data
                self._cond.notify_all()
        if message:
            log.warning(message, self.port, self.buffer_size)

    # -- input ----------------------------------------------------------------------------

    def _prompt_line(self, line: str) -> None:
        try:
            text = validate_prompt(line)
        except ControlError as err:
            with self._cond:
                self._counts["invalid_lines"] += 1
            log.warning("serial console %s: discarded a line: %s", self.port, err)
            self._emit_line(f"[line discarded: {err}]")
            return
        with self._cond:
            self._counts["prompts"] += 1
        log.info("serial console %s: prompt received (%d characters)", self.port, len(text))
        self._post(PromptRequest(text))

    def _overlong_line(self) -> None:
        with self._cond:
            self._counts["overlong_lines"] += 1
            total = self._counts["overlong_lines"]
        log.warning(
            "serial console %s: discarded a line longer than %d bytes (%d so far)",
            self.port, self.max_line, total,
        )
        self._emit_line(f"[line discarded: longer than {self.max_line} bytes]")

    # -- SerialLink callbacks: the reader thread owns opening and closing the port ------
    # start() runs the first open, and the writer thread may also call _lost.

    def _opened(self, port: serial.Serial) -> str:
        with self._cond:
            self._serial = port
            self._failed = False
            self._at_line_start = True
            self._counts["connects"] += 1
            missed, self._dropped_at_disconnect = self._dropped_at_disconnect, 0
            self._cond.notify_all()
        if missed:
            return f"; {missed} bytes of output were dropped while it was away"
        return ""

    def _take_input(self, data: bytes) -> bool:
        with self._cond:
            failed = self._failed
        if failed:
            return False  # the writer found the port gone and cancelled this read
        if data:
            self._lines.feed(data)
        return True

    def _lost(self, port: serial.Serial, exc: Exception) -> None:
        """Mark ``port`` as failed, once, and make the other thread let go of it."""
        with self._cond:
            if self._serial is not port or self._failed:
                return
            self._failed = True
            self._counts["disconnects"] += 1
            self._cond.notify_all()
        self._link.disconnected(exc)
        _cancel(port)

    def _released(self, port: serial.Serial) -> None:
        with self._cond:
            self._serial = None
            self._counts["bytes_dropped"] += len(self._out)
            self._dropped_at_disconnect += len(self._out)
            self._out.clear()
            if self._writing:
                port.cancel_write()
            while self._writing:
                self._cond.wait()
            self._failed = False
        self._lines.reset()

    # -- writer thread --------------------------------------------------------------------

    def _write_loop(self) -> None:
        while True:
            with self._cond:
                while not self._stop.is_set() and (self._serial is None or self._failed or not self._out):
                    self._cond.wait()
                if self._stop.is_set():
                    return
                port = self._serial
                chunk = bytes(self._out[:_WRITE_CHUNK])
                del self._out[:len(chunk)]
                self._writing = True
            written = 0
            try:
                written = port.write(chunk) or 0  # blocks while the port is slow; cancel_write() ends it
            except (serial.SerialException, OSError) as exc:
                self._lost(port, exc)
            finally:
                with self._cond:
                    self._writing = False
                    self._counts["bytes_written"] += written
                    self._counts["bytes_dropped"] += len(chunk) - written
                    if self._overflowing and len(self._out) <= self.buffer_size // 2:
                        self._overflowing = False
                        log.info("serial console %s: output caught up", self.port)
                    self._cond.notify_all()


def _cancel(port: serial.Serial) -> None:
    """Wake the threads blocked in ``port``'s read() and write()."""
    try:
        port.cancel_read()
        port.cancel_write()
    except OSError as exc:  # the other thread closed the port in between
        log.debug("serial console: cancelling I/O on a closing port: %s", exc)


def _check_marker(marker: str) -> None:
    try:
        marker.format(count=1)
    except (KeyError, IndexError, ValueError) as err:
        raise ConfigError(
            f"invalid serial console rewind_marker {marker!r} ({err}); "
            "use text with an optional {count} placeholder"
        ) from None


__all__ = ["ConsoleCounters", "PromptLineReader", "SerialConsole", "BACKOFF_INITIAL", "BACKOFF_MAX"]
