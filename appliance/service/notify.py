"""systemd service notifications (sd_notify): readiness, status, watchdog and stopping.

The protocol: the service manager passes a datagram socket address in NOTIFY_SOCKET,
and the service sends newline-separated ``KEY=value`` assignments to it, one message
per datagram. An address starting with "@" is in the abstract namespace, where the
"@" stands for a leading NUL byte. Without NOTIFY_SOCKET every call is a no-op, so
callers notify unconditionally. With NotifyAccess=main, systemd accepts messages from
the main process only, so notify from the daemon process itself, not from a child.

When systemd-python is importable and the notifier reads the process environment,
``systemd.daemon.notify`` sends the messages. Otherwise this module sends them itself
over an AF_UNIX datagram socket.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
from typing import Callable, Mapping

log = logging.getLogger(__name__)

try:
    from systemd import daemon as _systemd_daemon
except ImportError:
    _systemd_daemon = None
# The PyPI package "systemd" (cysystemd's former name) installs a systemd.daemon module
# too, whose notify() takes different arguments; only python-systemd's has listen_fds.
if _systemd_daemon is not None and not hasattr(_systemd_daemon, "listen_fds"):
    _systemd_daemon = None

# systemd (src/core/manager.c) reads notification datagrams into a PIPE_BUF buffer
# (4096 bytes on Linux) and ignores a longer datagram whole.
MAX_MESSAGE_BYTES = 4096
# A send failure is logged at most once in this many seconds.
FAILURE_LOG_INTERVAL = 60.0
# Maximum seconds a send may block when systemd's socket queue is full.
SEND_TIMEOUT = 2.0

_FIELD_NAME = re.compile(r"[A-Z][A-Z0-9_]*")


def _clean_value(value: object) -> str:
    """Return ``value`` as text that cannot start another assignment or break the datagram."""
    if value is True:
        return "1"
    if value is False:
        return "0"
    text = str(value)
    # A newline would end the assignment and let the rest of the value set another
    # variable; systemd ignores a datagram that contains a NUL byte.
    text = text.replace("\r\n", " ").replace("\n", " ").replace("\r", " ").replace("\0", "")
    return text


def _fit_message(lines: list[str]) -> bytes:
    """Encode ``lines`` as one datagram, shortening the last value so that it fits."""
    message = "\n".join(lines).encode("utf-8", "replace")
    if len(message) <= MAX_MESSAGE_BYTES:
        return message
    log.debug("sd_notify message of %d bytes shortened to %d", len(message), MAX_MESSAGE_BYTES)
    head = "\n".join(lines[:-1]).encode("utf-8", "replace")
    if head:
        head += b"\n"
    name, _, value = lines[-1].partition("=")
    room = MAX_MESSAGE_BYTES - len(head) - len(name.encode()) - 1 - len("…".encode())
    # Cut at a UTF-8 character boundary: drop the bytes of a partial character.
    shortened = value.encode("utf-8", "replace")[: max(room, 0)].decode("utf-8", "ignore")
    return head + f"{name}={shortened}…".encode("utf-8")


def _socket_address(raw: str) -> bytes | None:
    if raw.startswith("/"):
        return os.fsencode(raw)
    if raw.startswith("@") and len(raw) > 1:
        return b"\0" + os.fsencode(raw[1:])
    return None


class Notifier:
    """Send sd_notify messages to the service manager named by NOTIFY_SOCKET in ``env``.

    No method raises on a send failure: the first failure is logged as a warning,
    repeats at most once a minute, and the call returns False.
    """

    def __init__(self, env: Mapping[str, str] = os.environ, *, clock: Callable[[], float] = time.monotonic):
        self._env = env
        self._clock = clock
        self._lock = threading.Lock()
        self._socket: socket.socket | None = None
        self._failures = 0
        self._last_failure_log: float | None = None

        raw = env.get("NOTIFY_SOCKET") or ""
        self._address = _socket_address(raw) if raw else None
        if raw and self._address is None:
            # systemd 253 added vsock: addresses, for virtual machines; this appliance
            # targets systemd 252 (Debian 12), which only passes Unix socket paths.
            log.warning("NOTIFY_SOCKET=%r is not a Unix socket path; systemd notifications are off", raw)
        # systemd-python reads os.environ itself, so it fits only a notifier for that environment.
        self._use_libsystemd = self._address is not None and env is os.environ and _systemd_daemon is not None

    @property
    def enabled(self) -> bool:
        """True when a service manager is listening for notifications."""
        return self._address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between watchdog pings (half of WATCHDOG_USEC), or None without a watchdog.

        systemd sets WATCHDOG_PID to the main process; a child that inherited the
        variables must not ping, so another process's PID means no watchdog here.
        """
        pid = self._env.get("WATCHDOG_PID")
        if pid and pid != str(os.getpid()):
            return None
        raw = self._env.get("WATCHDOG_USEC")
        if not raw:
            return None
        try:
            usec = int(raw)
        except ValueError:
            log.warning("WATCHDOG_USEC=%r is not an integer; watchdog pings are off", raw)
            return None
        if usec <= 0:
            return None
        return usec / 2 / 1_000_000

    def notify(self, **fields: object) -> bool:
        """Send ``KEY=value`` assignments in one message; return True if it was sent.

        Newlines in values become spaces, so a value cannot set another variable.
        """
        for name in fields:
            if not _FIELD_NAME.fullmatch(name):
                raise ValueError(f"invalid sd_notify variable name {name!r}; expected upper-case letters, digits and _")
        if not fields or self._address is None:
            return False
        message = _fit_message([f"{name}={_clean_value(value)}" for name, value in fields.items()])
        return self._send(message)

    def ready(self, status: str | None = None) -> bool:
        """Tell systemd that start-up is finished (READY=1), with an optional status line."""
        if status is None:
            return self.notify(READY=1)
        return self.notify(READY=1, STATUS=status)

    def status(self, text: str) -> bool:
        """Set the status line that ``systemctl status`` shows."""
        return self.notify(STATUS=text)

    def extend_timeout(self, usec: int) -> bool:
        """Ask for ``usec`` more microseconds before the start or stop timeout fires."""
        if isinstance(usec, bool) or not isinstance(usec, int) or usec <= 0:
            raise ValueError(f"extend_timeout needs a positive integer of microseconds, not {usec!r}")
        return self.notify(EXTEND_TIMEOUT_USEC=usec)

    def watchdog(self) -> bool:
        """Ping the watchdog (WATCHDOG=1); call at least every ``watchdog_interval`` seconds."""
        return self.notify(WATCHDOG=1)

    def stopping(self, status: str | None = None) -> bool:
        """Tell systemd that the service is shutting down (STOPPING=1)."""
        if status is None:
            return self.notify(STOPPING=1)
        return self.notify(STOPPING=1, STATUS=status)

    def close(self) -> None:
        """Close the notification socket; a later message opens a new one."""
        with self._lock:
            if self._socket is not None:
                self._socket.close()
                self._socket = None

    def _send(self, message: bytes) -> bool:
        with self._lock:
            try:
                if self._use_libsystemd:
                    sent = _systemd_daemon.notify(message.decode("utf-8"))
                    if not sent:
                        raise OSError("systemd.daemon.notify did not send the message")
                else:
                    if self._socket is None:
                        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                        self._socket.settimeout(SEND_TIMEOUT)
                    self._socket.sendto(message, self._address)
            except OSError as exc:
                self._record_failure(exc)
                return False
            if self._failures:
                log.info("systemd notifications work again after %d failed sends", self._failures)
                self._failures = 0
                self._last_failure_log = None
            return True

    def _record_failure(self, exc: OSError) -> None:
        self._failures += 1
        now = self._clock()
        if self._last_failure_log is not None and now - self._last_failure_log < FAILURE_LOG_INTERVAL:
            return
        self._last_failure_log = now
        address = self._env.get("NOTIFY_SOCKET")
        if self._failures == 1:
            log.warning("sd_notify to %s failed: %s", address, exc)
        else:
            log.warning("sd_notify to %s still failing: %s (%d failed sends so far)", address, exc, self._failures)
        # A new socket on the next send, in case this one is in a bad state.
        if self._socket is not None:
            self._socket.close()
            self._socket = None
