"""Serial console: prompts in and story text out over a real pty read through real pyserial."""

import logging
import os
import queue
import threading

import pytest

from appliance.errors import ConfigError
from appliance.service.daemon import PromptRequest
from appliance.service.serial_console import BACKOFF_MAX, PromptLineReader, SerialConsole
from ptyport import WAIT, FastBackoff, adapter_fixture


class Prompts:
    """The daemon's post(): a queue of the events posted."""

    def __init__(self):
        self.events = queue.Queue()

    def __call__(self, event):
        self.events.put(event)

    def next(self):
        return self.events.get(timeout=WAIT)


adapter = adapter_fixture("ttyGS0")


@pytest.fixture
def make_console(adapter):
    consoles = []

    def make(**options):
        prompts = Prompts()
        backoff = FastBackoff()
        console = SerialConsole(adapter.link, 115200, post=prompts, sleep=backoff, **options)
        console.start()
        consoles.append(console)
        return console, prompts, backoff

    yield make
    for console in consoles:
        console.close()


@pytest.fixture
def console(adapter, make_console):
    """A console on a plugged-in adapter: (console, prompts)."""
    adapter.plug()
    serial_console, prompts, _ = make_console(max_line=32)
    assert serial_console.wait_connected(WAIT)
    return serial_console, prompts


def read_lines(data, max_line=32, chunks=1):
    lines = []
    overlong = []
    reader = PromptLineReader(max_line=max_line, on_line=lines.append, on_overlong=lambda: overlong.append(1))
    size = max(1, len(data) // chunks)
    for start in range(0, len(data), size):
        reader.feed(data[start:start + size])
    return lines, len(overlong)


# -- line splitting ---------------------------------------------------------------------

@pytest.mark.parametrize("end", [b"\r", b"\n", b"\r\n"])
def test_line_ends_accepted(end):
    lines, _ = read_lines(b"one" + end + b"two" + end)
    assert lines == ["one", "two"]


def test_empty_lines_ignored():
    lines, _ = read_lines(b"\r\n\r\n   \n\tthree\n")
    assert lines == ["three"]


def test_character_split_across_reads():
    lines, _ = read_lines("caf\u00e9 cr\u00e8me\n".encode(), chunks=14)
    assert lines == ["caf\u00e9 cr\u00e8me"]


def test_invalid_utf8_replaced():
    lines, _ = read_lines(b"caf\xe9 \xff\xfeok\n")
    assert lines == ["caf\ufffd \ufffd\ufffdok"]


def test_backspace_erases_character():
    lines, _ = read_lines(b"help\x7flo\ncaf\xc3\xa9\x08e\n")
    assert lines == ["hello", "cafe"]


def test_overlong_line_discarded():
    lines, overlong = read_lines(b"x" * 100 + b"\nok\n", chunks=7)
    assert lines == ["ok"]
    assert overlong == 1


def test_line_of_max_length_accepted():
    lines, overlong = read_lines(b"y" * 32 + b"\n")
    assert lines == ["y" * 32]
    assert overlong == 0


# -- prompts in, on a real pty ----------------------------------------------------------

def test_prompt_posted(console, adapter):
    serial_console, prompts = console
    adapter.send(b"Once upon a time\r")
    assert prompts.next() == PromptRequest("Once upon a time")
    assert serial_console.counters().prompts == 1


@pytest.mark.parametrize("end", [b"\r", b"\n", b"\r\n"])
def test_pty_line_ends(console, adapter, end):
    _, prompts = console
    adapter.send(b"first" + end + b"second" + end + b"third" + end)
    assert [prompts.next() for _ in range(3)] == [
        PromptRequest("first"), PromptRequest("second"), PromptRequest("third")
    ]
    adapter.send(b"marker\n")
    assert prompts.next() == PromptRequest("marker")  # no empty prompt came before it


def test_pty_invalid_utf8_replaced(console, adapter):
    _, prompts = console
    adapter.send(b"na\xefve\n")
    assert prompts.next() == PromptRequest("na\ufffdve")


def test_pty_overlong_line_discarded(console, adapter, caplog):
    serial_console, prompts = console
    adapter.send(b"z" * 100 + b"\nshort\n")
    assert prompts.next() == PromptRequest("short")
    assert serial_console.counters().overlong_lines == 1
    assert any("longer than 32 bytes" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def test_pty_overlong_line_reported_to_port(console, adapter):
    adapter.send(b"z" * 100 + b"\n")
    expected = b"[line discarded: longer than 32 bytes]\r\n"
    assert adapter.expect(expected) == expected


def test_control_characters_rejected(console, adapter):
    serial_console, prompts = console
    adapter.send(b"\x1b[Aup\nplain\n")
    assert prompts.next() == PromptRequest("plain")
    assert serial_console.counters().invalid_lines == 1


# -- story out, on a real pty -----------------------------------------------------------

def test_tokens_written(console, adapter):
    serial_console, _ = console
    serial_console.text_added("Once")
    serial_console.text_added(" upon")
    assert adapter.expect(b"Once upon") == b"Once upon"


def test_newline_written_as_crlf(console, adapter):
    serial_console, _ = console
    serial_console.text_added("a\nb")
    assert adapter.expect(b"a\r\nb") == b"a\r\nb"


def test_utf8_text_written(console, adapter):
    serial_console, _ = console
    serial_console.text_added("\u732b caf\u00e9")
    expected = "\u732b caf\u00e9".encode()
    assert adapter.expect(expected) == expected


def test_control_characters_in_text_replaced(console, adapter):
    serial_console, _ = console
    serial_console.text_added("a\x1bb")
    expected = "a\ufffdb".encode()
    assert adapter.expect(expected) == expected


def test_rewind_writes_backspaces(console, adapter):
    serial_console, _ = console
    serial_console.text_added("cat")
    serial_console.text_removed("at")
    expected = b"cat\b \b\b \b"
    assert adapter.expect(expected) == expected


def test_rewind_marker_configurable(adapter, make_console):
    adapter.plug()
    serial_console, _, _ = make_console(rewind_marker="<-{count}>")
    assert serial_console.wait_connected(WAIT)
    serial_console.text_added("cat")
    serial_console.text_removed("at")
    assert adapter.expect(b"cat<-2>") == b"cat<-2>"


def test_rewind_over_line_break_uses_marker(console, adapter):
    serial_console, _ = console
    serial_console.text_added("end.\nNext")
    serial_console.text_removed("\nNext")
    expected = b"end.\r\nNext\r\n[rewound 5 characters]\r\n"
    assert adapter.expect(expected) == expected


def test_story_header_and_footer(console, adapter):
    serial_console, _ = console
    serial_console.story_started(7, "Tell me\na story")
    serial_console.text_added("Once.")
    serial_console.story_ended("new story")
    expected = b"--- story 7: Tell me a story ---\r\nOnce.\r\n--- end of story 7 (new story) ---\r\n"
    assert adapter.expect(expected) == expected


def test_invalid_marker_rejected(adapter):
    with pytest.raises(ConfigError, match="rewind_marker"):
        SerialConsole(adapter.link, post=print, rewind_marker="{lines}")


def test_slow_port_never_blocks_mirror(adapter, make_console):
    adapter.plug()
    serial_console, _, _ = make_console(buffer_size=4096)
    assert serial_console.wait_connected(WAIT)

    # The test never reads the pty, so the port stops taking bytes once the pty buffer is full.
    crank = threading.Thread(target=lambda: [serial_console.text_added("w" * 1024) for _ in range(1024)])
    crank.start()
    crank.join(WAIT)
    assert not crank.is_alive()
    assert serial_console.counters().bytes_dropped > 0


def test_slow_port_overflow_logged_per_episode(adapter, make_console, caplog):
    caplog.set_level(logging.INFO, logger="appliance.service.serial_console")
    adapter.plug()
    serial_console, _, _ = make_console(buffer_size=4096)
    assert serial_console.wait_connected(WAIT)
    for _ in range(1024):
        serial_console.text_added("w" * 1024)
    episodes = [
        "full" if "output buffer full" in r.getMessage() else "caught up"
        for r in caplog.records
        if "output buffer full" in r.getMessage() or "caught up" in r.getMessage()
    ]
    dropped_writes = serial_console.counters().bytes_dropped // 1024
    assert episodes[0] == "full"
    assert all(first != second for first, second in zip(episodes, episodes[1:]))
    assert episodes.count("full") < dropped_writes


# -- unplug and replug ------------------------------------------------------------------

def test_reconnects_after_unplug(adapter, make_console, caplog):
    caplog.set_level(logging.DEBUG, logger="appliance.service.serial_console")
    adapter.plug()
    serial_console, prompts, backoff = make_console()
    assert serial_console.wait_connected(WAIT)
    adapter.send(b"before\n")
    assert prompts.next() == PromptRequest("before")

    adapter.unplug()
    assert backoff.called.wait(WAIT)
    while len(backoff.delays) < 8:  # let the backoff reach its cap while unplugged
        backoff.called.clear()
        assert backoff.called.wait(WAIT)
    adapter.plug()
    assert serial_console.wait_connected(WAIT)
    adapter.send(b"after\n")
    assert prompts.next() == PromptRequest("after")
    serial_console.text_added("back")
    assert adapter.expect(b"back") == b"back"

    assert backoff.delays[:6] == [1.0, 2.0, 4.0, 8.0, 16.0, BACKOFF_MAX]
    assert max(backoff.delays) == BACKOFF_MAX
    counters = serial_console.counters()
    assert counters.connects == 2
    assert counters.disconnects == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len([m for m in warnings if "disconnected" in m]) == 1
    assert len([m for m in warnings if "unavailable" in m]) == 1


def test_writes_while_unplugged_dropped(adapter, make_console):
    adapter.plug()
    serial_console, _, backoff = make_console()
    assert serial_console.wait_connected(WAIT)
    adapter.unplug()
    assert backoff.called.wait(WAIT)
    serial_console.text_added("lost")
    serial_console.text_removed("st")
    assert serial_console.counters().bytes_dropped == len(b"lost" + b"\b \b" * 2)


def test_unplugged_text_not_replayed(adapter, make_console):
    adapter.plug()
    serial_console, _, backoff = make_console()
    assert serial_console.wait_connected(WAIT)
    adapter.unplug()
    assert backoff.called.wait(WAIT)
    serial_console.text_added("lost")
    adapter.plug()
    assert serial_console.wait_connected(WAIT)
    serial_console.text_added("kept")
    assert adapter.expect(b"kept") == b"kept"


def test_write_to_unplugged_port_detected(adapter, make_console):
    adapter.plug()
    serial_console, _, backoff = make_console()
    assert serial_console.wait_connected(WAIT)
    os.close(adapter.master)  # the far end goes away; the symlink stays
    adapter.master = None
    serial_console.text_added("into the void")
    assert backoff.called.wait(WAIT)
    assert serial_console.counters().disconnects == 1
    os.unlink(adapter.link)
    os.close(adapter.slave)


def test_missing_port_at_start_retries(adapter, make_console):
    serial_console, prompts, backoff = make_console()
    assert backoff.called.wait(WAIT)
    assert serial_console.state == "unavailable"
    adapter.plug()
    assert serial_console.wait_connected(WAIT)
    adapter.send(b"late\n")
    assert prompts.next() == PromptRequest("late")


def test_close_stops_threads(console):
    serial_console, _ = console
    serial_console.close()
    assert serial_console.state == "stopped"


# -- settings ---------------------------------------------------------------------------

def test_port_required():
    with pytest.raises(ConfigError, match="port"):
        SerialConsole("", post=print)


@pytest.mark.parametrize("baudrate", [0, -9600, "fast"])
def test_invalid_baudrate_rejected(baudrate):
    with pytest.raises(ConfigError, match="baudrate"):
        SerialConsole("/dev/ttyGS0", baudrate, post=print)


@pytest.mark.parametrize("max_line", [0, 8, "long"])
def test_invalid_max_line_rejected(max_line):
    with pytest.raises(ConfigError, match="max_line"):
        SerialConsole("/dev/ttyGS0", post=print, max_line=max_line)


def test_invalid_newline_rejected():
    with pytest.raises(ConfigError, match="newline"):
        SerialConsole("/dev/ttyGS0", post=print, newline="\n\r")
