"""Serial pulse source: the line protocol, and a real pty read through real pyserial."""

import logging

import pytest

from appliance.crank.events import CrankQueue, Press, Rewind, Step
from appliance.crank.serial_pulses import BACKOFF_MAX, LineParser, SerialPulseSource
from appliance.crank.source import open_crank
from appliance.errors import ConfigError
from ptyport import WAIT, FastBackoff, adapter_fixture


class Recorder:
    def __init__(self):
        self.events = []

    def detents(self, count):
        self.events.append(count)

    def press(self, long):
        self.events.append("L" if long else "P")


def parse(data, max_line=256, chunks=1):
    recorder = Recorder()
    parser = LineParser(on_detents=recorder.detents, on_press=recorder.press, max_line=max_line)
    size = max(1, len(data) // chunks)
    for start in range(0, len(data), size):
        parser.feed(data[start:start + size])
    return recorder.events, parser.counts


# -- line protocol ----------------------------------------------------------------------

def test_protocol_lines_parsed():
    events, counts = parse(b"+3\n-1\nP\nL\n")
    assert events == [3, -1, "P", "L"]
    assert counts["lines"] == 4
    assert counts["detents"] == 4


def test_crlf_and_spaces_accepted():
    events, _ = parse(b" +2 \r\n-10\r\n")
    assert events == [2, -10]


def test_lines_split_across_reads():
    events, _ = parse(b"+12\n-3\nP\n+1\n", chunks=13)
    assert events == [12, -3, "P", 1]


def test_comments_and_empty_lines_ignored():
    events, counts = parse(b"# crank pulses v1\n\n+1\n")
    assert events == [1]
    assert counts["invalid_lines"] == 0


@pytest.mark.parametrize("line", [b"3", b"+", b"++1", b"+1000", b"p", b"PL", b"+1 P", b"\xff\xfe"])
def test_invalid_line_skipped_and_counted(line):
    events, counts = parse(line + b"\n+1\n")
    assert events == [1]
    assert counts["invalid_lines"] == 1
    assert counts["invalid_bytes"] == len(line) + 1


def test_zero_count_is_valid_no_op():
    events, counts = parse(b"+0\n")
    assert events == []
    assert counts["invalid_lines"] == 0


def test_overlong_line_bounded_and_counted():
    events, counts = parse(b"x" * 5000 + b"\n+2\n", max_line=64, chunks=50)
    assert events == [2]
    assert counts["overlong_lines"] == 1


def test_line_of_max_length_accepted():
    events, counts = parse(b"#" + b"x" * 63 + b"\n+1\n", max_line=64)
    assert events == [1]
    assert counts["overlong_lines"] == 0


def test_invalid_max_line_rejected():
    with pytest.raises(ConfigError):
        LineParser(on_detents=print, on_press=print, max_line=2)


# -- a real pty ------------------------------------------------------------------------

adapter = adapter_fixture("ttyCRANK")


@pytest.fixture
def serial_crank():
    opened = []

    def open_(port, **settings):
        queue = CrankQueue(**settings)
        backoff = FastBackoff()
        crank = open_crank(queue=queue, source="serial", serial_port=port,
                           serial_sleep=backoff, max_line=64)
        opened.append((crank, queue))
        return crank, queue, backoff

    yield open_
    for crank, queue in opened:
        queue.close()
        crank.close()


def test_pty_protocol_lines(adapter, serial_crank):
    adapter.plug()
    crank, queue, _ = serial_crank(adapter.link)
    assert crank.serial.wait_connected(WAIT)
    adapter.send(b"+3\n-1\nP\nL\n-2\n")
    received = [queue.get(timeout=WAIT) for _ in range(6)]
    assert received == [Step(1), Step(1), Press(long=False), Press(long=True), Rewind(1), Rewind(1)]


def test_pty_garbage_counted(adapter, serial_crank):
    adapter.plug()
    crank, queue, _ = serial_crank(adapter.link)
    assert crank.serial.wait_connected(WAIT)
    adapter.send(b"\x00\xffnoise\n+1\n")
    assert queue.get(timeout=WAIT) == Step(1)
    counters = crank.serial.counters()
    assert counters.invalid_lines == 1
    assert counters.invalid_bytes == 8


def test_pty_overlong_line_counted(adapter, serial_crank):
    adapter.plug()
    crank, queue, _ = serial_crank(adapter.link)
    assert crank.serial.wait_connected(WAIT)
    adapter.send(b"+" * 300)
    adapter.send(b"1\n+2\n")
    assert [queue.get(timeout=WAIT) for _ in range(2)] == [Step(1), Step(1)]
    assert crank.serial.counters().overlong_lines == 1


def test_pty_reconnects_after_unplug(adapter, serial_crank, caplog):
    caplog.set_level(logging.DEBUG, logger="appliance.crank.serial_pulses")
    adapter.plug()
    crank, queue, backoff = serial_crank(adapter.link)
    assert crank.serial.wait_connected(WAIT)
    adapter.send(b"+1\n")
    assert queue.get(timeout=WAIT) == Step(1)

    adapter.unplug()
    assert backoff.called.wait(WAIT)
    while len(backoff.delays) < 8:  # let the backoff reach its cap while unplugged
        backoff.called.clear()
        assert backoff.called.wait(WAIT)
    adapter.plug()
    assert crank.serial.wait_connected(WAIT)
    adapter.send(b"+1\n")
    assert queue.get(timeout=WAIT) == Step(1)

    assert backoff.delays[:6] == [1.0, 2.0, 4.0, 8.0, 16.0, BACKOFF_MAX]
    assert max(backoff.delays) == BACKOFF_MAX
    counters = crank.serial.counters()
    assert counters.connects == 2
    assert counters.disconnects == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len([m for m in warnings if "disconnected" in m]) == 1
    assert len([m for m in warnings if "unavailable" in m]) == 1


def test_missing_port_at_start_retries(adapter, serial_crank):
    crank, queue, backoff = serial_crank(adapter.link)
    assert backoff.called.wait(WAIT)
    assert crank.serial.state == "unavailable"
    adapter.plug()
    assert crank.serial.wait_connected(WAIT)
    adapter.send(b"-1\n")
    assert queue.get(timeout=WAIT) == Rewind(1)


def test_close_stops_reader(adapter, serial_crank):
    adapter.plug()
    crank, _queue, _ = serial_crank(adapter.link)
    assert crank.serial.wait_connected(WAIT)
    crank.close()
    assert crank.serial.state == "stopped"


def test_port_required():
    with pytest.raises(ConfigError, match="port"):
        SerialPulseSource(queue=CrankQueue(), port="")


@pytest.mark.parametrize("baudrate", [0, -9600, "fast"])
def test_invalid_baudrate_rejected(baudrate):
    with pytest.raises(ConfigError, match="baudrate"):
        SerialPulseSource(queue=CrankQueue(), port="/dev/ttyACM0", baudrate=baudrate)
