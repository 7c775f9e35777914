"""Logging setup: the systemd journal under the service, readable stderr elsewhere.

Under systemd (JOURNAL_STREAM or NOTIFY_SOCKET set) records go to the journal through
systemd-python's JournalHandler when it is installed, with SYSLOG_IDENTIFIER=crankllm
and structured fields. Without systemd-python they go to stderr, which systemd
connects to the journal, with a ``<N>`` syslog priority prefix on every line (the
sd-daemon.h convention, which journald parses) and no timestamp, since journald adds
one. Outside systemd they go to stderr with a timestamp.

Structured fields travel in ``extra={"fields": {...}}``; ``journal_fields`` builds
that dict and checks the names:

    log.info("decoded token %d", index, extra=journal_fields(STORY_ID=7, TOKEN_INDEX=index))
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, TextIO

SYSLOG_IDENTIFIER = "crankllm"
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}

# journald accepts field names of at most 64 upper-case ASCII letters, digits and
# underscores, not starting with a digit. A leading underscore marks the trusted
# fields that only journald itself may set.
_FIELD_NAME = re.compile(r"[A-Z][A-Z0-9_]{0,63}")


def journal_fields(**fields: Any) -> dict[str, dict[str, Any]]:
    """Return the ``extra`` argument that attaches structured journal fields to a record."""
    for name in fields:
        if not _FIELD_NAME.fullmatch(name):
            raise ValueError(f"invalid journal field name {name!r}; expected upper-case letters, digits and _")
    return {"fields": fields}


def _record_fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = getattr(record, "fields", None)
    return fields if isinstance(fields, dict) else {}


def syslog_priority(levelno: int) -> int:
    """Map a logging level to a syslog priority (sd-daemon.h SD_ERR=3 ... SD_DEBUG=7)."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


class JournalFieldsFilter(logging.Filter):
    """Copy ``record.fields`` onto the record as attributes, where JournalHandler looks for fields."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in _record_fields(record).items():
            setattr(record, name, value)
        return True


class _FieldsFormatter(logging.Formatter):
    """A formatter that appends the structured fields as ``[NAME=value ...]``."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        text = super().formatMessage(record)
        fields = _record_fields(record)
        if fields:
            text += " [" + " ".join(f"{name}={value}" for name, value in fields.items()) + "]"
        return text


class ConsoleFormatter(_FieldsFormatter):
    """Format for a terminal: time, level, logger, message, fields."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")


class JournalStreamFormatter(_FieldsFormatter):
    """Format for stderr read by journald: a ``<N>`` priority on each line, no time."""

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        # journald reads the prefix per line, so each traceback line keeps the priority.
        return "\n".join(prefix + line for line in super().format(record).split("\n"))


@dataclass
class _Window:
    """One rate-limit period of one logger and message template."""

    start: float
    last: logging.LogRecord
    passed: int = 1
    suppressed: int = 0


class RateLimitFilter(logging.Filter):
    """Pass at most ``burst`` records of one logger and message template per ``period`` seconds.

    The suppressed count is reported through ``emit`` as one "suppressed N repeats"
    record once the period has ended: when the next record of any kind passes this
    filter, or when ``flush`` is called.
    """

    def __init__(
        self,
        emit: Callable[[logging.LogRecord], Any],
        *,
        burst: int = 5,
        period: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        super().__init__()
        if burst < 1:
            raise ValueError(f"burst must be 1 or more, not {burst!r}")
        if period <= 0:
            raise ValueError(f"period must be greater than 0, not {period!r}")
        self._emit = emit
        self._burst = burst
        self._period = period
        self._clock = clock
        self._lock = threading.Lock()
        self._windows: dict[tuple[str, str], _Window] = {}  # by logger name and message template

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "rate_limit_summary", False):
            return True
        now = self._clock()
        key = (record.name, str(record.msg))
        with self._lock:
            summaries = self._expire(now)
            window = self._windows.get(key)
            if window is None:
                self._windows[key] = _Window(start=now, last=record)
                passed = True
            elif window.passed < self._burst:
                window.passed += 1
                window.last = record
                passed = True
            else:
                window.suppressed += 1
                window.last = record
                passed = False
        for summary in summaries:
            self._emit(summary)
        return passed

    def flush(self) -> None:
        """Report every count suppressed so far, even in periods still running."""
        with self._lock:
            summaries = [self._summary(window) for window in self._windows.values() if window.suppressed]
            self._windows.clear()
        for summary in summaries:
            self._emit(summary)

    def _expire(self, now: float) -> list[logging.LogRecord]:
        summaries = []
        expired = [key for key, window in self._windows.items() if now - window.start >= self._period]
        for key in expired:
            window = self._windows.pop(key)
            if window.suppressed:
                summaries.append(self._summary(window))
        return summaries

    def _summary(self, window: _Window) -> logging.LogRecord:
        last = window.last
        elapsed = max(self._clock() - window.start, 0.0)
        return logging.makeLogRecord({
            "name": last.name,
            "levelno": last.levelno,
            "levelname": last.levelname,
            "pathname": last.pathname,
            "lineno": last.lineno,
            "funcName": last.funcName,
            "msg": "suppressed %d repeats of %r in %.0f s",
            "args": (window.suppressed, str(last.msg), elapsed),
            "rate_limit_summary": True,
        })


_installed: tuple[logging.Handler, RateLimitFilter] | None = None


# journald's socket for structured records (sd_journal_sendv writes here).
JOURNAL_SOCKET = "/run/systemd/journal/socket"


def _journal_handler() -> logging.Handler | None:
    # A notify socket does not prove journald runs (a test harness or another
    # supervisor can set NOTIFY_SOCKET), and without its socket JournalHandler's
    # records would be lost, so stderr takes over then.
    if not os.path.exists(JOURNAL_SOCKET):
        return None
    try:
        from systemd.journal import JournalHandler
    except ImportError:
        return None
    return JournalHandler(SYSLOG_IDENTIFIER=SYSLOG_IDENTIFIER)


def under_systemd(env: Mapping[str, str]) -> bool:
    """True when systemd started this process with its stdio or notify socket set up."""
    return bool(env.get("JOURNAL_STREAM") or env.get("NOTIFY_SOCKET"))


def setup_logging(
    level: str | int,
    *,
    env: Mapping[str, str] = os.environ,
    stream: TextIO | None = None,
    journal_handler: logging.Handler | None = None,
    burst: int = 5,
    period: float = 10.0,
    clock: Callable[[], float] = time.monotonic,
) -> logging.Handler:
    """Install the one root handler for ``level`` ("debug" .. "error") and return it.

    ``journal_handler`` replaces systemd-python's JournalHandler under systemd (for
    tests); ``burst``, ``period`` and ``clock`` set the repeat limit. Calling again
    replaces the handler installed before.
    """
    global _installed
    if isinstance(level, str):
        if level not in LEVELS:
            raise ValueError(f"unknown log level {level!r}; expected one of {', '.join(LEVELS)}")
        level = LEVELS[level]
    stream = stream if stream is not None else sys.stderr

    handler: logging.Handler | None = None
    if under_systemd(env):
        handler = journal_handler or _journal_handler()
        if handler is not None:
            handler.setFormatter(logging.Formatter("%(message)s"))
            handler.addFilter(JournalFieldsFilter())
        else:
            handler = logging.StreamHandler(stream)
            handler.setFormatter(JournalStreamFormatter())
    else:
        handler = logging.StreamHandler(stream)
        handler.setFormatter(ConsoleFormatter())

    rate_limit = RateLimitFilter(handler.handle, burst=burst, period=period, clock=clock)
    # Filters run in the order added: the repeat limit must see records before fields are copied.
    handler.filters.insert(0, rate_limit)

    root = logging.getLogger()
    if _installed is not None:
        old_handler, old_filter = _installed
        old_filter.flush()
        root.removeHandler(old_handler)
        old_handler.close()
        atexit.unregister(old_filter.flush)
    root.addHandler(handler)
    root.setLevel(level)
    # Runs before logging's own exit hook (registered earlier, run later), while the handler is open.
    atexit.register(rate_limit.flush)
    logging.captureWarnings(True)
    _installed = (handler, rate_limit)
    return handler
