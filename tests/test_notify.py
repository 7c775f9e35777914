"""Tests for the systemd side of the service: sd_notify over real Unix datagram
sockets (appliance.service.notify) and logging to the journal (appliance.service.journal).
"""

import atexit
import io
import logging
import os
import re
import socket
import uuid

import pytest

from appliance.service import journal
from appliance.service import notify as notify_module
from appliance.service.journal import RateLimitFilter, journal_fields, setup_logging
from appliance.service.notify import MAX_MESSAGE_BYTES, Notifier


@pytest.fixture(autouse=True)
def own_implementation(monkeypatch):
    """Send through this module's own socket code even where systemd-python is installed."""
    monkeypatch.setattr(notify_module, "_systemd_daemon", None)


@pytest.fixture
def path_listener(tmp_path):
    """A datagram socket bound to a file path, as systemd's /run/systemd/notify is."""
    path = str(tmp_path / "notify.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(path)
    listener.settimeout(5)
    yield listener, path
    listener.close()


@pytest.fixture
def abstract_listener():
    """A datagram socket in the abstract namespace, named as NOTIFY_SOCKET writes it: @name."""
    name = f"crankllm-test-{os.getpid()}-{uuid.uuid4().hex}"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(b"\0" + name.encode())
    listener.settimeout(5)
    yield listener, "@" + name
    listener.close()


def receive(listener) -> bytes:
    return listener.recv(65536)


def nothing_waiting(listener) -> bool:
    listener.setblocking(False)
    try:
        listener.recv(65536)
    except BlockingIOError:
        return True
    return False


def test_ready_on_path_socket(path_listener):
    listener, path = path_listener
    notifier = Notifier({"NOTIFY_SOCKET": path})
    assert notifier.ready()
    assert receive(listener) == b"READY=1"


def test_ready_on_abstract_socket(abstract_listener):
    listener, address = abstract_listener
    notifier = Notifier({"NOTIFY_SOCKET": address})
    assert notifier.ready("Loaded tiny.gguf")
    assert receive(listener) == b"READY=1\nSTATUS=Loaded tiny.gguf"


def test_status_is_utf8(path_listener):
    listener, path = path_listener
    Notifier({"NOTIFY_SOCKET": path}).status("Erzählung 7 · 🦜 ready")
    assert receive(listener) == "STATUS=Erzählung 7 · 🦜 ready".encode("utf-8")


def test_status_newline_cannot_add_variable(path_listener):
    listener, path = path_listener
    Notifier({"NOTIFY_SOCKET": path}).status("line one\nREADY=1\r\nthree\rfour")
    assert receive(listener) == b"STATUS=line one READY=1 three four"


def test_status_nul_removed(path_listener):
    listener, path = path_listener
    Notifier({"NOTIFY_SOCKET": path}).status("a\0b")
    assert receive(listener) == b"STATUS=ab"


def test_extend_timeout_message(path_listener):
    listener, path = path_listener
    Notifier({"NOTIFY_SOCKET": path}).extend_timeout(30_000_000)
    assert receive(listener) == b"EXTEND_TIMEOUT_USEC=30000000"


@pytest.mark.parametrize("usec", [0, -5, 1.5, True, "100"])
def test_extend_timeout_rejects_bad_value(usec):
    with pytest.raises(ValueError):
        Notifier({}).extend_timeout(usec)


def test_watchdog_message(path_listener):
    listener, path = path_listener
    Notifier({"NOTIFY_SOCKET": path}).watchdog()
    assert receive(listener) == b"WATCHDOG=1"


def test_stopping_message(path_listener):
    listener, path = path_listener
    Notifier({"NOTIFY_SOCKET": path}).stopping("Shutting down")
    assert receive(listener) == b"STOPPING=1\nSTATUS=Shutting down"


def test_notify_fields_in_order(path_listener):
    listener, path = path_listener
    Notifier({"NOTIFY_SOCKET": path}).notify(STATUS="x", ERRNO=5, READY=True)
    assert receive(listener) == b"STATUS=x\nERRNO=5\nREADY=1"


@pytest.mark.parametrize("name", ["status", "A-B", "1ABC", "A B"])
def test_notify_rejects_bad_name(name):
    with pytest.raises(ValueError):
        Notifier({}).notify(**{name: "x"})


def test_long_status_is_shortened(path_listener):
    listener, path = path_listener
    Notifier({"NOTIFY_SOCKET": path}).status("é" * 5000)
    message = receive(listener)
    assert len(message) <= MAX_MESSAGE_BYTES
    assert message.startswith(b"STATUS=\xc3\xa9")
    assert message.decode("utf-8").endswith("é…")


def test_each_call_is_one_datagram(path_listener):
    listener, path = path_listener
    notifier = Notifier({"NOTIFY_SOCKET": path})
    notifier.status("one")
    notifier.watchdog()
    assert receive(listener) == b"STATUS=one"
    assert receive(listener) == b"WATCHDOG=1"


def test_noop_without_socket(path_listener):
    listener, _ = path_listener
    notifier = Notifier({})
    assert not notifier.enabled
    assert notifier.ready("x") is False
    assert notifier.watchdog() is False
    assert nothing_waiting(listener)


def test_enabled_with_socket(path_listener):
    _, path = path_listener
    assert Notifier({"NOTIFY_SOCKET": path}).enabled


def test_vsock_address_disables(caplog):
    notifier = Notifier({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not notifier.enabled
    assert "not a Unix socket path" in caplog.text


def test_send_error_logged_once(tmp_path, caplog):
    clock = [0.0]
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")}, clock=lambda: clock[0])
    with caplog.at_level(logging.WARNING, logger=notify_module.__name__):
        results = [notifier.watchdog() for _ in range(5)]
    assert results == [False] * 5
    assert len(caplog.records) == 1
    assert "gone.sock failed" in caplog.records[0].getMessage()


def test_send_error_logged_again_later(tmp_path, caplog):
    clock = [0.0]
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")}, clock=lambda: clock[0])
    with caplog.at_level(logging.WARNING, logger=notify_module.__name__):
        notifier.watchdog()
        notifier.watchdog()
        clock[0] = 61.0
        notifier.watchdog()
    assert len(caplog.records) == 2
    assert "3 failed sends so far" in caplog.records[1].getMessage()


def test_recovery_is_logged(tmp_path, caplog):
    path = str(tmp_path / "late.sock")
    notifier = Notifier({"NOTIFY_SOCKET": path})
    with caplog.at_level(logging.INFO, logger=notify_module.__name__):
        assert not notifier.watchdog()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        listener.bind(path)
        try:
            assert notifier.watchdog()
            assert listener.recv(100) == b"WATCHDOG=1"
        finally:
            listener.close()
    assert "work again after 1 failed sends" in caplog.text


def test_watchdog_interval_is_half():
    assert Notifier({"WATCHDOG_USEC": "500000"}).watchdog_interval == 0.25


def test_watchdog_interval_for_our_pid():
    notifier = Notifier({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())})
    assert notifier.watchdog_interval == 15.0


def test_watchdog_interval_for_other_pid():
    notifier = Notifier({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)})
    assert notifier.watchdog_interval is None


@pytest.mark.parametrize("value", [None, "", "0", "abc", "-1"])
def test_watchdog_interval_absent(value):
    env = {} if value is None else {"WATCHDOG_USEC": value}
    assert Notifier(env).watchdog_interval is None


def test_libsystemd_sends_message(path_listener, monkeypatch):
    daemon = pytest.importorskip("systemd.daemon", reason="systemd-python is not installed")
    listener, path = path_listener
    monkeypatch.setattr(notify_module, "_systemd_daemon", daemon)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert Notifier().ready("line one\nline two")
    assert receive(listener) == b"READY=1\nSTATUS=line one line two"


def test_libsystemd_error_is_logged(tmp_path, monkeypatch, caplog):
    daemon = pytest.importorskip("systemd.daemon", reason="systemd-python is not installed")
    monkeypatch.setattr(notify_module, "_systemd_daemon", daemon)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    with caplog.at_level(logging.WARNING, logger=notify_module.__name__):
        assert Notifier().watchdog() is False
    assert "failed" in caplog.text


def test_reads_process_environment(path_listener, monkeypatch):
    listener, path = path_listener
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    Notifier().ready()
    assert receive(listener) == b"READY=1"


# --- Logging to the journal (appliance.service.journal) --------------------------------

@pytest.fixture
def root_logger(monkeypatch):
    """Restore the root logger's handlers and level after setup_logging changed them."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    monkeypatch.setattr(journal, "_installed", None)
    yield root
    if journal._installed is not None:
        handler, rate_limit = journal._installed
        atexit.unregister(rate_limit.flush)
        handler.close()
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.captureWarnings(False)


@pytest.fixture
def no_systemd_python(monkeypatch):
    monkeypatch.setattr(journal, "_journal_handler", lambda: None)


class FakeJournalHandler(logging.Handler):
    """Stands in for systemd.journal.JournalHandler: sends MESSAGE, PRIORITY and upper-case record attributes."""

    def __init__(self):
        super().__init__()
        self.sent = []

    def emit(self, record):
        fields = {name: value for name, value in vars(record).items() if name.isupper()}
        self.sent.append({"MESSAGE": self.format(record), "PRIORITY": journal.syslog_priority(record.levelno), **fields})


def test_console_format_has_time_and_level(root_logger):
    stream = io.StringIO()
    setup_logging("info", env={}, stream=stream)
    logging.getLogger("appliance.test").info("crank ready on %s", "GPIO17")
    line = stream.getvalue()
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO appliance.test: crank ready on GPIO17\n", line)


def test_console_format_shows_fields(root_logger):
    stream = io.StringIO()
    setup_logging("info", env={}, stream=stream)
    logging.getLogger("appliance.test").info("step", extra=journal_fields(STORY_ID=7, DECODE_MS=12.5))
    assert stream.getvalue().endswith("step [STORY_ID=7 DECODE_MS=12.5]\n")


def test_journal_stream_has_priority_prefix(root_logger, no_systemd_python):
    stream = io.StringIO()
    setup_logging("debug", env={"JOURNAL_STREAM": "8:1234"}, stream=stream)
    log = logging.getLogger("appliance.test")
    log.debug("d")
    log.info("i")
    log.warning("w")
    log.error("e")
    log.critical("c")
    assert stream.getvalue().splitlines() == [
        "<7>appliance.test: d",
        "<6>appliance.test: i",
        "<4>appliance.test: w",
        "<3>appliance.test: e",
        "<2>appliance.test: c",
    ]


def test_notify_socket_means_systemd(root_logger, no_systemd_python):
    stream = io.StringIO()
    setup_logging("info", env={"NOTIFY_SOCKET": "/run/systemd/notify"}, stream=stream)
    logging.getLogger("appliance.test").info("hello")
    assert stream.getvalue() == "<6>appliance.test: hello\n"


def test_journal_stream_prefixes_traceback_lines(root_logger, no_systemd_python):
    stream = io.StringIO()
    setup_logging("info", env={"JOURNAL_STREAM": "8:1234"}, stream=stream)
    try:
        raise RuntimeError("decode failed")
    except RuntimeError:
        logging.getLogger("appliance.test").exception("step failed")
    lines = stream.getvalue().splitlines()
    assert len(lines) > 3
    assert all(line.startswith("<3>") for line in lines)
    assert lines[-1] == "<3>RuntimeError: decode failed"


def test_journal_handler_gets_fields(root_logger):
    fake = FakeJournalHandler()
    installed = setup_logging("info", env={"JOURNAL_STREAM": "8:1234"}, journal_handler=fake)
    logging.getLogger("appliance.test").info("token", extra=journal_fields(STORY_ID=7, TOKEN_INDEX=3, DECODE_MS=41.5))
    assert installed is fake
    assert fake.sent[0]["MESSAGE"] == "token"
    assert fake.sent[0]["STORY_ID"] == 7
    assert fake.sent[0]["TOKEN_INDEX"] == 3
    assert fake.sent[0]["DECODE_MS"] == 41.5
    assert fake.sent[0]["PRIORITY"] == 6


def test_real_journal_handler_sends_fields(root_logger, monkeypatch):
    journal_module = pytest.importorskip("systemd.journal", reason="systemd-python is not installed")
    sent = []

    def sender(MESSAGE, **fields):
        sent.append((MESSAGE, fields))

    real = journal_module.JournalHandler(sender_function=sender)
    setup_logging("info", env={"JOURNAL_STREAM": "8:1234"}, journal_handler=real)
    logging.getLogger("appliance.test").info("token", extra=journal_fields(STORY_ID=7))
    assert sent[0][0] == "token"
    assert sent[0][1]["STORY_ID"] == 7


@pytest.mark.parametrize("name", ["story_id", "_PID", "1ST", "A-B", "A" * 65])
def test_journal_fields_rejects_name(name):
    with pytest.raises(ValueError):
        journal_fields(**{name: 1})


def test_level_filters_records(root_logger):
    stream = io.StringIO()
    setup_logging("warning", env={}, stream=stream)
    logging.getLogger("appliance.test").info("hidden")
    assert stream.getvalue() == ""


def test_unknown_level_is_error(root_logger):
    with pytest.raises(ValueError, match="unknown log level 'loud'"):
        setup_logging("loud", env={})


def test_setup_twice_keeps_one_handler(root_logger):
    before = len(root_logger.handlers)
    first = setup_logging("info", env={}, stream=io.StringIO())
    second = setup_logging("info", env={}, stream=io.StringIO())
    assert first not in root_logger.handlers
    assert second in root_logger.handlers
    assert len(root_logger.handlers) == before + 1


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_repeats_are_suppressed(root_logger):
    stream = io.StringIO()
    setup_logging("info", env={}, stream=stream, burst=3, period=10.0, clock=Clock())
    log = logging.getLogger("appliance.test")
    for index in range(10):
        log.warning("busy pin %s", index)
    assert stream.getvalue().count("busy pin") == 3


def test_suppressed_count_reported_later(root_logger, no_systemd_python):
    stream = io.StringIO()
    clock = Clock()
    setup_logging("info", env={"JOURNAL_STREAM": "8:1"}, stream=stream, burst=2, period=10.0, clock=clock)
    log = logging.getLogger("appliance.test")
    for _ in range(6):
        log.warning("busy pin %s", "GPIO17")
    clock.now = 12.0
    log.warning("busy pin %s", "GPIO17")
    assert stream.getvalue().splitlines() == [
        "<4>appliance.test: busy pin GPIO17",
        "<4>appliance.test: busy pin GPIO17",
        "<4>appliance.test: suppressed 4 repeats of 'busy pin %s' in 12 s",
        "<4>appliance.test: busy pin GPIO17",
    ]


def test_other_templates_pass(root_logger):
    stream = io.StringIO()
    setup_logging("info", env={}, stream=stream, burst=1, period=10.0, clock=Clock())
    log = logging.getLogger("appliance.test")
    log.info("first %s", 1)
    log.info("second %s", 2)
    logging.getLogger("appliance.other").info("first %s", 3)
    assert stream.getvalue().count(": first") == 2
    assert stream.getvalue().count(": second") == 1


def test_flush_reports_running_period():
    emitted = []
    rate_limit = RateLimitFilter(emitted.append, burst=1, period=60.0, clock=Clock())
    record = logging.makeLogRecord({"name": "appliance.test", "msg": "again", "levelno": logging.INFO})
    assert rate_limit.filter(record)
    assert not rate_limit.filter(record)
    assert not rate_limit.filter(record)
    rate_limit.flush()
    assert len(emitted) == 1
    assert emitted[0].getMessage() == "suppressed 2 repeats of 'again' in 0 s"


def test_notify_socket_without_journald_logs_to_stderr(monkeypatch, root_logger):
    monkeypatch.setattr(journal, "JOURNAL_SOCKET", "/nonexistent/journal/socket")
    stream = io.StringIO()
    handler = journal.setup_logging("info", env={"NOTIFY_SOCKET": "/run/notify"}, stream=stream)
    logging.getLogger("appliance.test").info("still visible")
    assert isinstance(handler, logging.StreamHandler)
    assert "<6>appliance.test: still visible" in stream.getvalue()
