"""Tests for appliance.service.transcript: the file format, crash safety and fsync timing."""

import logging
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from appliance.service import transcript as transcript_module
from appliance.service.transcript import TranscriptWriter, read_transcript

REPO_ROOT = Path(__file__).resolve().parents[1]
# 2026-12-04 19:45:00 UTC
START_TIME = 1796413500.0


class Clock:
    def __init__(self, now=0.0):
        self.now = now

    def __call__(self):
        return self.now


def new_writer(directory, **kwargs):
    kwargs.setdefault("wall_clock", lambda: START_TIME)
    return TranscriptWriter(str(directory), **kwargs)


@pytest.fixture
def fsyncs(monkeypatch):
    """Record the inode of every file or folder passed to os.fsync, then really sync it."""
    calls = []
    real_fsync = os.fsync

    def counting_fsync(fd):
        calls.append(os.fstat(fd).st_ino)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counting_fsync)
    return calls


# --- Format ---------------------------------------------------------------------------


def test_file_name_from_time_and_id(tmp_path):
    writer = new_writer(tmp_path)
    path = writer.start_story(7, {})
    assert os.path.basename(path) == "20261204T194500Z-0007.txt"


def test_same_second_gets_new_name(tmp_path):
    writer = new_writer(tmp_path)
    first = writer.start_story(7, {})
    writer.end_story("stop")
    second = writer.start_story(7, {})
    assert os.path.basename(first) == "20261204T194500Z-0007.txt"
    assert os.path.basename(second) == "20261204T194500Z-0007-2.txt"


def test_header_round_trip(tmp_path):
    writer = new_writer(tmp_path)
    header = {
        "model": "/var/lib/crankllm/models/tiny.gguf",
        "bits_per_weight": 4.85,
        "seed": 1234,
        "temperature": 0.8,
        "top_k": 40,
        "prompt": 'Say "hi"\nthen\tstop \u2028 \x10 🦜',
        "chat": True,
        "missing": None,
    }
    path = writer.start_story(3, header)
    writer.end_story("stop")
    record = read_transcript(path)
    assert record.header == {"story": 3, "started": "2026-12-04T19:45:00Z", **header}


def test_header_starts_file(tmp_path):
    writer = new_writer(tmp_path)
    path = writer.start_story(3, {"seed": 5})
    assert Path(path).read_text(encoding="utf-8") == (
        '# crankllm-transcript: 1\n# story: 3\n# started: "2026-12-04T19:45:00Z"\n# seed: 5\n\n'
    )


def test_plain_text_is_raw(tmp_path):
    writer = new_writer(tmp_path)
    path = writer.start_story(1, {})
    writer.append("Once upon")
    writer.append(" a time.\n")
    body = Path(path).read_text(encoding="utf-8").split("\n\n", 1)[1]
    assert body == "Once upon a time.\n"


def test_round_trip_with_rewinds(tmp_path):
    writer = new_writer(tmp_path)
    path = writer.start_story(1, {})
    for piece in ["The", " keeper", " lit", " the"]:
        writer.append(piece)
    writer.rewind(" the")
    writer.rewind(" lit")
    writer.append(" climbed")
    writer.end_story("stop")
    record = read_transcript(path)
    assert record.text == "The keeper climbed"
    assert record.rewinds == 2
    assert record.removed == [" the", " lit"]
    assert record.complete


def test_round_trip_odd_text(tmp_path):
    pieces = [
        "line one\nline two\r\n",
        "# end: stop 3\n",
        "\x10rewind \"x\"\n",
        "\x10",
        "\x10\x10\n",
        "e\u0301 \u2028 \u2029 \x00 \x1b[31m",
        "🦜🏳️‍🌈",
        "",
        "\ufeff\uffff",
    ]
    writer = new_writer(tmp_path)
    path = writer.start_story(1, {})
    for piece in pieces:
        writer.append(piece)
    writer.rewind("\ufeff\uffff")
    writer.rewind("🏳️‍🌈")
    writer.end_story("eos")
    record = read_transcript(path)
    assert record.text == "".join(pieces[:6]) + "🦜"
    assert record.end_reason == "eos"


def test_rewind_of_dle(tmp_path):
    writer = new_writer(tmp_path)
    path = writer.start_story(1, {})
    writer.append("a\x10")
    writer.rewind("\x10")
    writer.end_story("stop")
    assert read_transcript(path).text == "a"


def test_rewind_across_appends(tmp_path):
    writer = new_writer(tmp_path)
    path = writer.start_story(1, {})
    writer.append("ab")
    writer.append("cd")
    writer.append("ef")
    writer.rewind("def")
    writer.end_story("stop")
    assert read_transcript(path).text == "abc"


def test_rewind_of_newline(tmp_path):
    writer = new_writer(tmp_path)
    path = writer.start_story(1, {})
    writer.append("first\n")
    writer.rewind("\n")
    writer.append(" and more")
    writer.end_story("stop")
    assert read_transcript(path).text == "first and more"


def test_lone_surrogate_becomes_replacement(tmp_path):
    writer = new_writer(tmp_path)
    path = writer.start_story(1, {})
    writer.append("a\ud800b")
    writer.rewind("\ud800b")
    writer.end_story("stop")
    record = read_transcript(path)
    assert record.text == "a"
    assert record.removed == ["\ufffdb"]


def test_footer_counts_tokens(tmp_path):
    writer = new_writer(tmp_path)
    path = writer.start_story(1, {})
    for piece in ["a", "b", "", "c"]:
        writer.append(piece)
    writer.rewind("c")
    writer.end_story("context full")
    record = read_transcript(path)
    assert record.tokens == 3
    assert record.end_reason == "context_full"
    assert Path(path).read_text(encoding="utf-8").endswith("\n\nabc\x10rewind \"c\"\n\x10\n# end: context_full 3\n")


def test_footer_takes_given_tokens(tmp_path):
    writer = new_writer(tmp_path)
    path = writer.start_story(1, {})
    writer.append("a")
    writer.end_story("stop", tokens=12)
    assert read_transcript(path).tokens == 12


def test_story_without_end_is_incomplete(tmp_path):
    writer = new_writer(tmp_path)
    path = writer.start_story(1, {})
    writer.append("so far")
    record = read_transcript(path)
    assert record.text == "so far"
    assert not record.complete
    assert record.end_reason is None


def test_close_ends_story(tmp_path):
    writer = new_writer(tmp_path)
    path = writer.start_story(1, {})
    writer.append("x")
    writer.close()
    record = read_transcript(path)
    assert record.complete
    assert record.end_reason == "shutdown"
    assert writer.path is None


def test_new_story_ends_open_one(tmp_path):
    writer = new_writer(tmp_path)
    first = writer.start_story(1, {})
    writer.append("x")
    writer.start_story(2, {})
    assert read_transcript(first).end_reason == "interrupted"


def test_calls_between_stories_are_ignored(tmp_path):
    writer = new_writer(tmp_path)
    writer.append("lost")
    writer.rewind("lost")
    writer.end_story("stop")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("key", ["Prompt", "top-k", "", "story", "started", "1st"])
def test_header_key_rejected(tmp_path, key):
    with pytest.raises(ValueError):
        new_writer(tmp_path).start_story(1, {key: 1})


@pytest.mark.parametrize("story_id", [-1, "7", True, 1.0])
def test_story_id_rejected(tmp_path, story_id):
    with pytest.raises(ValueError):
        new_writer(tmp_path).start_story(story_id, {})


def test_header_value_falls_back_to_str(tmp_path):
    writer = new_writer(tmp_path)
    path = writer.start_story(1, {"model": Path("/m/tiny.gguf")})
    assert read_transcript(path).header["model"] == "/m/tiny.gguf"


# --- Reading cut and broken files ---------------------------------------------------------


def cut_copies(path, tmp_path):
    """Yield (cut file path, bytes kept) for every prefix of the file at ``path``."""
    data = Path(path).read_bytes()
    for length in range(len(data) + 1):
        cut = tmp_path / f"cut-{length}.txt"
        cut.write_bytes(data[:length])
        yield str(cut), length


def test_every_cut_reads(tmp_path):
    writer = new_writer(tmp_path / "stories")
    path = writer.start_story(1, {"prompt": "p"})
    writer.append("Hé🦜\n")
    writer.rewind("🦜\n")
    writer.append("\x10!")
    writer.end_story("stop")
    # The text on screen after each step; a cut file shows the start of one of them.
    screens = ["Hé🦜\n", "Hé", "Hé\x10!"]
    for cut, length in cut_copies(path, tmp_path):
        record = read_transcript(cut)
        assert any(screen.startswith(record.text) for screen in screens), length
        assert record.complete == (length == os.path.getsize(path)), length


def test_not_a_transcript(tmp_path):
    other = tmp_path / "notes.txt"
    other.write_text("hello\n", encoding="utf-8")
    with pytest.raises(ValueError, match="not a crankllm transcript"):
        read_transcript(str(other))


def test_newer_format_rejected(tmp_path):
    other = tmp_path / "future.txt"
    other.write_text("# crankllm-transcript: 2\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="unsupported transcript format"):
        read_transcript(str(other))


def test_mismatched_rewind_rejected(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text('# crankllm-transcript: 1\n\nabc\x10rewind "x"\n', encoding="utf-8")
    with pytest.raises(ValueError, match="does not match the end of the text"):
        read_transcript(str(bad))


def test_unknown_marker_rejected(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("# crankllm-transcript: 1\n\nabc\x10pause 3\n", encoding="utf-8")
    with pytest.raises(ValueError, match="unknown marker"):
        read_transcript(str(bad))


def test_invalid_utf8_rejected(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"# crankllm-transcript: 1\n\nab\xffcd")
    with pytest.raises(ValueError, match="byte 28: not valid UTF-8"):
        read_transcript(str(bad))


# --- Durability --------------------------------------------------------------------------

CHILD_SCRIPT = textwrap.dedent(
    """
    import sys
    from appliance.service.transcript import TranscriptWriter

    writer = TranscriptWriter(sys.argv[1], fsync_interval=3600)
    path = writer.start_story(7, {"prompt": "Tell me a story."})
    writer.append("Hello")
    writer.append(", world\\n")
    writer.rewind("world\\n")
    writer.append("crank 🦜")
    print(path, flush=True)
    sys.stdin.readline()
    """
)


def test_sigkill_keeps_flushed_text(tmp_path):
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD_SCRIPT, str(tmp_path / "stories")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=REPO_ROOT,
        text=True,
    )
    try:
        path = child.stdout.readline().strip()
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
        child.stdin.close()
        child.stdout.close()
    record = read_transcript(path)
    assert record.text == "Hello, crank 🦜"
    assert record.header["prompt"] == "Tell me a story."
    assert not record.complete


def test_fsync_interval_honoured(tmp_path, fsyncs):
    clock = Clock(100.0)
    writer = new_writer(tmp_path, fsync_interval=5.0, clock=clock)
    path = writer.start_story(1, {})
    story_inode = os.stat(path).st_ino
    fsyncs.clear()

    for second in range(1, 5):
        clock.now = 100.0 + second
        writer.append("x")
    assert fsyncs == []

    clock.now = 105.0
    writer.append("x")
    assert fsyncs == [story_inode]

    for second in range(6, 10):
        clock.now = 100.0 + second
        writer.append("x")
    assert len(fsyncs) == 1

    clock.now = 110.0
    writer.rewind("x")
    assert fsyncs == [story_inode, story_inode]


def test_fsync_at_story_end(tmp_path, fsyncs):
    clock = Clock()
    writer = new_writer(tmp_path, fsync_interval=5.0, clock=clock)
    path = writer.start_story(1, {})
    fsyncs.clear()
    writer.append("x")
    writer.end_story("stop")
    assert fsyncs == [os.stat(path).st_ino]


def test_fsync_every_step_at_zero(tmp_path, fsyncs):
    writer = new_writer(tmp_path, fsync_interval=0, clock=Clock())
    writer.start_story(1, {})
    fsyncs.clear()
    for _ in range(3):
        writer.append("x")
    assert len(fsyncs) == 3


def test_start_syncs_folder(tmp_path, fsyncs):
    new_writer(tmp_path / "stories").start_story(1, {})
    assert os.stat(tmp_path / "stories").st_ino in fsyncs


def test_negative_fsync_interval_rejected(tmp_path):
    with pytest.raises(ValueError):
        new_writer(tmp_path, fsync_interval=-1)


# --- Folders and disk errors ----------------------------------------------------------------


def test_folder_created_with_mode(tmp_path):
    old_umask = os.umask(0o022)
    try:
        new_writer(tmp_path / "a" / "stories").start_story(1, {})
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(os.stat(tmp_path / "a" / "stories").st_mode) == 0o750


def test_file_mode(tmp_path):
    old_umask = os.umask(0o022)
    try:
        path = new_writer(tmp_path).start_story(1, {})
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640


def test_unusable_folder_is_logged_once(tmp_path, caplog):
    blocker = tmp_path / "stories"
    blocker.write_text("a file where the folder should be", encoding="utf-8")
    writer = new_writer(blocker)
    with caplog.at_level(logging.ERROR, logger=transcript_module.__name__):
        for story_id in range(3):
            assert writer.start_story(story_id, {}) is None
            writer.append("text")
            writer.end_story("stop")
    assert len(caplog.records) == 1
    assert "story transcript start failed" in caplog.records[0].getMessage()


def test_recovers_when_folder_is_usable(tmp_path, caplog):
    blocker = tmp_path / "stories"
    blocker.write_text("x", encoding="utf-8")
    writer = new_writer(blocker)
    with caplog.at_level(logging.INFO, logger=transcript_module.__name__):
        assert writer.start_story(1, {}) is None
        blocker.unlink()
        path = writer.start_story(2, {})
    assert path is not None
    assert "written again" in caplog.text


FULL_DISK_SCRIPT = textwrap.dedent(
    """
    import logging, resource, signal, sys
    from appliance.service.transcript import TranscriptWriter, read_transcript

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")
    # Writes past RLIMIT_FSIZE fail with EFBIG once SIGXFSZ is ignored: a real
    # kernel write error, standing in for a full disk.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (300, 300))
    writer = TranscriptWriter(sys.argv[1], fsync_interval=0)
    path = writer.start_story(1, {})
    for index in range(100):
        writer.append(f"token {index:03d} ")
    writer.end_story("stop")
    print(path)
    print(read_transcript(path).text)
    """
)


def test_write_error_does_not_stop_story(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", FULL_DISK_SCRIPT, str(tmp_path / "stories")],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1
    assert "File too large" in errors[0]
    path, text = result.stdout.split("\n", 1)
    assert os.path.getsize(path) <= 300
    assert text.startswith("token 000 token 001 ")
    assert not read_transcript(path).complete
