"""Story transcripts: one text file per story, written as the crank turns.

The format is described in docs/transcripts.md. In short: ``# key: <JSON value>``
header lines, a blank line, then the generated text as raw UTF-8. The control
character DLE (U+0010) introduces a marker: DLE DLE is a literal DLE in the text,
``DLE rewind <JSON string> LF`` removes that string from the end of the text, and
``DLE LF`` ends the text and is followed by the footer ``# end: <reason> <tokens>``.

Every append reaches the kernel at once (one write call, no user-space buffer), so a
killed process loses nothing. fsync runs every ``fsync_interval`` seconds and at the
end of each story, which bounds what a power cut can lose.
"""

from __future__ import annotations

import codecs
import errno
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Mapping

log = logging.getLogger(__name__)

FORMAT_KEY = "# crankllm-transcript: "
FORMAT_LINE = FORMAT_KEY + "1"
DLE = "\x10"
REWIND = "rewind "
DIR_MODE = 0o750
FILE_MODE = 0o640

_HEADER_KEY = re.compile(r"[a-z][a-z0-9_]*")
_RESERVED_KEYS = ("story", "started")
_SURROGATE = re.compile("[\ud800-\udfff]")
_END_LINE = re.compile(r"# end: (\S+) (\d+)")


def _clean_text(text: str) -> str:
    # A lone surrogate cannot be encoded as UTF-8; U+FFFD is what a UTF-8 decoder
    # would have shown for the bytes that produced it.
    return _SURROGATE.sub("\ufffd", text)


def _escape(text: str) -> str:
    return _clean_text(text).replace(DLE, DLE + DLE)


def _story_file_name(started: datetime, story_id: int, attempt: int) -> str:
    suffix = "" if attempt == 0 else f"-{attempt + 1}"
    return f"{started:%Y%m%dT%H%M%SZ}-{story_id:04d}{suffix}.txt"


class TranscriptWriter:
    """Write each story to its own file in ``directory``, created with mode 0750 if missing.

    Disk errors (ENOSPC, EROFS, EACCES ...) never propagate: the error is logged,
    the rest of that story is not written, and the next story tries again. The same
    error is logged once until a story is written without error again. Not
    thread-safe: call it from the daemon loop only.
    """

    def __init__(
        self,
        directory: str,
        *,
        fsync_interval: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ):
        if fsync_interval < 0:
            raise ValueError(f"fsync_interval must be 0 or more seconds, not {fsync_interval!r}")
        self.directory = directory
        self.fsync_interval = fsync_interval
        self._clock = clock
        self._wall_clock = wall_clock
        self._fd: int | None = None
        self._path: str | None = None
        self._tokens = 0
        self._last_sync = 0.0
        self._unsynced = False
        self._logged_error: tuple[str, int | None] | None = None

    @property
    def path(self) -> str | None:
        """The file of the story being written, or None between stories or after an error."""
        return self._path if self._fd is not None else None

    def start_story(self, story_id: int, header: Mapping[str, Any]) -> str | None:
        """Create the story's file and write its header; return its path, or None on a disk error.

        ``header`` keys are lower-case identifiers; values are written as JSON (other
        objects as their str()). The writer adds ``story`` and ``started`` (UTC).
        A story still open is ended first with reason "interrupted".
        """
        if isinstance(story_id, bool) or not isinstance(story_id, int) or story_id < 0:
            raise ValueError(f"story_id must be an integer 0 or more, not {story_id!r}")
        for key in header:
            if not isinstance(key, str) or not _HEADER_KEY.fullmatch(key):
                raise ValueError(f"invalid transcript header key {key!r}; expected lower-case letters, digits and _")
            if key in _RESERVED_KEYS:
                raise ValueError(f"transcript header key {key!r} is set by the writer")
        if self._fd is not None:
            log.warning("story transcript %s was still open; ending it as interrupted", self._path)
            self.end_story("interrupted")

        started = datetime.fromtimestamp(self._wall_clock(), timezone.utc).replace(microsecond=0)
        lines = [FORMAT_LINE, f"# story: {story_id}", f"# started: {json.dumps(started.strftime('%Y-%m-%dT%H:%M:%SZ'))}"]
        for key, value in header.items():
            lines.append(f"# {key}: {json.dumps(value, ensure_ascii=False, default=str)}")
        data = ("\n".join(lines) + "\n\n").encode("utf-8", "replace")

        self._tokens = 0
        self._path = None
        try:
            os.makedirs(self.directory, mode=DIR_MODE, exist_ok=True)
            self._fd, self._path = self._create(started, story_id)
            self._write(data)
            # Sync the folder so the new file's name survives a power cut too.
            self._sync_directory()
        except OSError as exc:
            self._fail("start", exc)
            return None
        self._last_sync = self._clock()
        self._unsynced = True
        if self._logged_error is not None:
            log.info("story transcripts are written again, to %s", self._path)
            self._logged_error = None
        return self._path

    def append(self, text: str) -> None:
        """Add one decode step's text to the story (counted as one token)."""
        if self._fd is None:
            return
        self._tokens += 1
        if text:
            self._write_or_fail(_escape(text).encode("utf-8"))

    def rewind(self, removed_text: str) -> None:
        """Record that ``removed_text`` was taken off the end of the text on screen (one token)."""
        if self._fd is None:
            return
        self._tokens = max(self._tokens - 1, 0)
        marker = DLE + REWIND + json.dumps(_clean_text(removed_text), ensure_ascii=False) + "\n"
        self._write_or_fail(marker.encode("utf-8"))

    def end_story(self, reason: str, *, tokens: int | None = None) -> None:
        """Write the footer, fsync and close the file.

        ``tokens`` defaults to the appends minus the rewinds of this story. ``reason``
        is one word; whitespace in it becomes "_".
        """
        if self._fd is None:
            return
        word = re.sub(r"\s+", "_", reason.strip()) or "unknown"
        count = self._tokens if tokens is None else tokens
        footer = f"{DLE}\n# end: {word} {count}\n".encode("utf-8", "replace")
        try:
            self._write(footer)
            os.fsync(self._fd)
        except OSError as exc:
            self._fail("end", exc)
            return
        self._close_file()

    def close(self) -> None:
        """End a story still open with reason "shutdown"."""
        if self._fd is not None:
            self.end_story("shutdown")

    def _create(self, started: datetime, story_id: int) -> tuple[int, str]:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC
        # Story ids restart at 1 with the service, so a name can already exist
        # when two stories start within the same second.
        for attempt in range(100):
            path = os.path.join(self.directory, _story_file_name(started, story_id, attempt))
            try:
                return os.open(path, flags, FILE_MODE), path
            except FileExistsError:
                continue
        raise FileExistsError(errno.EEXIST, "no free transcript file name", path)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        self._unsynced = True

    def _write_or_fail(self, data: bytes) -> None:
        try:
            self._write(data)
            self._sync_if_due()
        except OSError as exc:
            self._fail("write", exc)

    def _sync_if_due(self) -> None:
        now = self._clock()
        if self._unsynced and now - self._last_sync >= self.fsync_interval:
            os.fsync(self._fd)
            self._last_sync = now
            self._unsynced = False

    def _sync_directory(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _fail(self, action: str, exc: OSError) -> None:
        key = (action, exc.errno)
        if self._logged_error != key:
            log.error(
                "story transcript %s failed for %s: %s; the story goes on without the rest of its transcript",
                action, self._path or self.directory, exc,
            )
            self._logged_error = key
        self._close_file()

    def _close_file(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.close(fd)
            except OSError as exc:
                log.debug("closing transcript %s failed: %s", self._path, exc)


# --- Reading -------------------------------------------------------------------------


@dataclass(frozen=True)
class TranscriptRecord:
    """A transcript as read back: the header, the text on screen at the end, and whether it ended."""

    header: dict[str, Any]
    text: str
    complete: bool
    end_reason: str | None = None
    tokens: int | None = None
    rewinds: int = 0
    removed: list[str] = field(default_factory=list)


class _TextBuffer:
    """The story text as chunks, so that a rewind drops chunks instead of copying the text."""

    def __init__(self) -> None:
        self.chunks: list[str] = []

    def add(self, text: str) -> None:
        if text:
            self.chunks.append(text)

    def remove_suffix(self, removed: str) -> bool:
        """Remove ``removed`` from the end; return False if the text does not end with it."""
        need = removed
        while need:
            if not self.chunks:
                return False
            last = self.chunks[-1]
            if len(last) <= len(need):
                if not need.endswith(last):
                    return False
                need = need[: len(need) - len(last)]
                self.chunks.pop()
            else:
                if not last.endswith(need):
                    return False
                self.chunks[-1] = last[: len(last) - len(need)]
                need = ""
        return True

    def text(self) -> str:
        return "".join(self.chunks)


def read_transcript(path: str) -> TranscriptRecord:
    """Read a transcript and rebuild the text as it was on screen, rewinds applied.

    A file cut short (the writer was killed or lost power) reads up to its last
    complete record, with ``complete`` False. Raise ValueError for a file that is
    not a transcript or contains an invalid record.
    """
    with open(path, "rb") as file:
        data = file.read()
    # A cut can split a UTF-8 sequence at the very end; final=False leaves it out.
    try:
        content = codecs.getincrementaldecoder("utf-8")().decode(data, final=False)
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: byte {exc.start}: not valid UTF-8") from None

    header, body_start = _read_header(path, content)
    if body_start is None:
        return TranscriptRecord(header=header, text="", complete=False)
    return _read_body(path, content, body_start, header)


def _read_header(path: str, content: str) -> tuple[dict[str, Any], int | None]:
    """Parse the header; return it and the offset of the text, or None if the file ends first."""
    if not (content.startswith(FORMAT_KEY) or FORMAT_KEY.startswith(content)):
        raise ValueError(f"{path}: not a crankllm transcript; expected the first line {FORMAT_LINE!r}")
    header: dict[str, Any] = {}
    position = 0
    line_number = 0
    while True:
        end = content.find("\n", position)
        if end < 0:
            return header, None
        line = content[position:end]
        line_number += 1
        position = end + 1
        if line_number == 1:
            if line != FORMAT_LINE:
                raise ValueError(f"{path}: unsupported transcript format {line!r}; expected {FORMAT_LINE!r}")
            continue
        if line == "":
            return header, position
        match = re.fullmatch(r"# ([a-z][a-z0-9_]*): (.*)", line)
        if match is None:
            raise ValueError(f"{path}: line {line_number}: invalid header line {line!r}; expected '# key: value'")
        try:
            header[match.group(1)] = json.loads(match.group(2))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: line {line_number}: invalid header value: {exc.msg}") from None


def _read_body(path: str, content: str, position: int, header: dict[str, Any]) -> TranscriptRecord:
    text = _TextBuffer()
    removed: list[str] = []
    while True:
        marker = content.find(DLE, position)
        if marker < 0:
            text.add(content[position:])
            return TranscriptRecord(header, text.text(), False, rewinds=len(removed), removed=removed)
        text.add(content[position:marker])
        kind = content[marker + 1 : marker + 2]
        if kind == "":
            # The file ends inside a marker.
            return TranscriptRecord(header, text.text(), False, rewinds=len(removed), removed=removed)
        if kind == DLE:
            text.add(DLE)
            position = marker + 2
            continue
        line_end = content.find("\n", marker)
        if line_end < 0:
            return TranscriptRecord(header, text.text(), False, rewinds=len(removed), removed=removed)
        record = content[marker + 1 : line_end]
        if record == "":
            end_reason, tokens = _read_footer(path, content[line_end + 1 :])
            complete = end_reason is not None
            return TranscriptRecord(header, text.text(), complete, end_reason, tokens, len(removed), removed)
        if not record.startswith(REWIND):
            raise ValueError(f"{path}: character {marker}: unknown marker {record[:20]!r}")
        try:
            removed_text = json.loads(record[len(REWIND) :])
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: character {marker}: invalid rewind marker: {exc.msg}") from None
        if not isinstance(removed_text, str) or not text.remove_suffix(removed_text):
            raise ValueError(
                f"{path}: character {marker}: rewind of {removed_text!r} does not match the end of the text"
            )
        removed.append(removed_text)
        position = line_end + 1


def _read_footer(path: str, footer: str) -> tuple[str | None, int | None]:
    """Parse ``# end: <reason> <tokens>``; (None, None) if it was cut short."""
    if not footer.endswith("\n"):
        return None, None
    line = footer.split("\n", 1)[0]
    match = _END_LINE.fullmatch(line)
    if match is None:
        raise ValueError(f"{path}: invalid footer {line!r}; expected '# end: <reason> <tokens>'")
    return match.group(1), int(match.group(2))
