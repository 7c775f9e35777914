"""The control socket: `crankllm status|prompt|new|tail` talk to the daemon through it.

The daemon listens on a Unix stream socket in its runtime directory, mode 0660 and
group crankllm, so local users in that group (for example over ssh) can control it.
There is no network listener.

Each connection carries one request: a JSON object on one line of at most
MAX_REQUEST_BYTES. The server replies with one JSON line and closes the connection,
except for ``tail``, which keeps it open and streams the story as JSON event lines.
docs/control-protocol.md describes the protocol.

One thread serves every connection with a selector, so an idle server blocks in
select() with no timeout. The server is also a Mirror: the worker thread calls it
during a decode step, and it only appends bytes to each tail client's bounded
buffer and wakes the selector through a pipe. A client that reads too slowly is
dropped when its buffer is full, so it never slows the crank.
"""

from __future__ import annotations

import collections
import errno
import grp
import json
import logging
import os
import selectors
import socket
import stat
import threading
import time
import unicodedata
from collections.abc import Callable

from appliance.errors import ControlError

log = logging.getLogger(__name__)

# One request line, LF included. Requests are a command and at most one prompt, whose
# JSON form (control characters escaped) stays well below this.
MAX_REQUEST_BYTES = 8192
MAX_PROMPT_CHARS = 2000
# Longest reply or event line a client accepts. Event lines are much shorter: story
# text is sent in pieces of REPLAY_CHUNK_CHARS, and prompts are limited by n_ctx.
MAX_REPLY_BYTES = 1 << 20
COMMANDS = ("status", "prompt", "new", "tail", "crank")
# Detents one crank request may carry, either way: a few revolutions of a real crank.
MAX_CRANK_DETENTS = 1000

MAX_CONNECTIONS = 32
# A client must send its request, and read its reply, within this many seconds.
REQUEST_TIMEOUT_S = 10.0
# Bytes waiting for one tail client before the server drops it as too slow. At a
# hand-cranked pace (a few tokens per second) this is hours of text.
TAIL_BUFFER_BYTES = 256 * 1024
# Story text kept for the replay that starts each `tail`. A story that outgrows
# the context window can go on indefinitely, so only its end is kept.
REPLAY_MAX_CHARS = 64 * 1024
REPLAY_CHUNK_CHARS = 4096
# Wait for a connect() while checking whether an existing socket is alive.
PROBE_TIMEOUT_S = 2.0
# Pause before accepting again after accept() failed (out of file descriptors).
ACCEPT_RETRY_S = 1.0

_SEND_CHUNK = 64 * 1024
_RECV_CHUNK = 4096


# -- protocol helpers shared with the client and the serial console --------------------


def validate_prompt(text: object) -> str:
    """Return ``text`` if it is usable as a prompt, else raise ControlError saying why.

    A prompt is a non-blank string of at most MAX_PROMPT_CHARS characters, encodable
    as UTF-8, with no control characters other than newline and tab.
    """
    if not isinstance(text, str):
        raise ControlError(f"prompt must be a string, not {type(text).__name__}")
    if not text.strip():
        raise ControlError("prompt is empty; give the text the story should start from")
    if len(text) > MAX_PROMPT_CHARS:
        raise ControlError(
            f"prompt is {len(text)} characters long; the maximum is {MAX_PROMPT_CHARS}"
        )
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ControlError(
            f"prompt is not valid UTF-8 (lone surrogate at character {err.start})"
        ) from None
    for index, char in enumerate(text):
        if char not in "\n\t" and unicodedata.category(char) == "Cc":
            raise ControlError(
                f"prompt contains control character U+{ord(char):04X} at character {index}; "
                "only newline and tab are allowed"
            )
    return text


def printable(text: str) -> str:
    """Replace control characters other than newline and tab with U+FFFD.

    Model output may contain escape sequences or carriage returns; a terminal or a
    printer would act on them. One character becomes one character, so the number
    of characters to erase on a rewind stays the same.
    """
    if text.isprintable():
        return text
    return "".join(
        "\ufffd" if char not in "\n\t" and unicodedata.category(char) == "Cc" else char
        for char in text
    )


def display_width(text: str) -> int:
    """Return the terminal columns ``text`` takes on one line.

    Wide East Asian characters take two columns and combining marks none.
    """
    width = 0
    for char in text:
        if unicodedata.combining(char) or unicodedata.category(char) in ("Mn", "Me", "Cf"):
            continue
        width += 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1
    return width


def encode_message(message: dict) -> bytes:
    """Encode one protocol message as a JSON line."""
    text = json.dumps(message, ensure_ascii=False, separators=(",", ":"), default=str)
    return text.encode("utf-8", "replace") + b"\n"


def parse_request(line: bytes) -> dict:
    """Decode and validate one request line (without its LF).

    Returns the request with a validated ``text`` for ``prompt``; raises ControlError
    with the message the server sends back.
    """
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ControlError(f"request is not valid UTF-8 (invalid byte at offset {err.start})") from None
    try:
        request = json.loads(text)
    except json.JSONDecodeError as err:
        raise ControlError(f"request is not valid JSON: {err.msg} at character {err.pos}") from None
    except RecursionError:
        raise ControlError("request is not valid JSON: nested too deeply") from None
    if not isinstance(request, dict):
        raise ControlError("request must be a JSON object such as {\"command\": \"status\"}")

    command = request.get("command")
    if command not in COMMANDS:
        quoted = json.dumps(command, ensure_ascii=False)[:40]
        raise ControlError(f"unknown command {quoted}; expected one of {', '.join(COMMANDS)}")
    allowed = {"prompt": {"command", "text"}, "crank": {"command", "detents"}}.get(command, {"command"})
    unexpected = sorted(set(request) - allowed)
    if unexpected:
        quoted = json.dumps(unexpected[0], ensure_ascii=False)[:40]
        raise ControlError(f"unexpected field {quoted} in a {command} request")
    if command == "prompt":
        if "text" not in request:
            raise ControlError("prompt request has no \"text\" field")
        validate_prompt(request["text"])
    if command == "crank":
        detents = request.get("detents")
        if isinstance(detents, bool) or not isinstance(detents, int) or detents == 0 \
                or abs(detents) > MAX_CRANK_DETENTS:
            raise ControlError(
                f"invalid detents {json.dumps(detents)[:40]}: expected a non-zero integer from "
                f"-{MAX_CRANK_DETENTS} to {MAX_CRANK_DETENTS} (negative turns back)"
            )
    return request


# -- the server -------------------------------------------------------------------------


class _Connection:
    """One client connection; ``out`` is shared with the worker thread under the lock."""

    __slots__ = (
        "sock", "inbuf", "out", "deadline", "following", "close_when_sent",
        "at_line_start", "dropped", "writing",
    )

    def __init__(self, sock: socket.socket, deadline: float):
        self.sock = sock
        self.inbuf = bytearray()
        self.out = bytearray()
        self.deadline: float | None = deadline
        self.following = False      # a tail client receiving story events
        self.close_when_sent = False
        self.at_line_start = True   # the last byte sent ended a line
        self.dropped = False        # a tail client dropped for reading too slowly
        self.writing = False        # registered for EVENT_WRITE


class _Story:
    """The current story as tail clients replay it: id, prompt and the end of its text."""

    def __init__(self, max_chars: int):
        self.story_id: int | None = None
        self.prompt = ""
        self.ended: str | None = None
        self.omitted = 0            # characters dropped from the front to stay bounded
        self._max_chars = max_chars
        self._chunks: collections.deque[str] = collections.deque()
        self._length = 0

    def start(self, story_id: int, prompt: str) -> None:
        self.story_id = story_id
        self.prompt = prompt
        self.ended = None
        self.omitted = 0
        self._chunks.clear()
        self._length = 0

    def add(self, text: str) -> None:
        self._chunks.append(text)
        self._length += len(text)
        while self._length > self._max_chars and len(self._chunks) > 1:
            dropped = self._chunks.popleft()
            self._length -= len(dropped)
            self.omitted += len(dropped)

    def remove(self, count: int) -> None:
        while count and self._chunks:
            last = self._chunks[-1]
            if len(last) <= count:
                self._chunks.pop()
                self._length -= len(last)
                count -= len(last)
            else:
                self._chunks[-1] = last[:-count]
                self._length -= count
                count = 0

    def text(self) -> str:
        return "".join(self._chunks)


class ControlServer:
    """Serve the control socket at ``path`` and stream the story to tail clients.

    ``snapshot`` returns the daemon's state as a JSON-able dict, and ``post`` hands
    an event (PromptRequest, NewStory) to the worker. ``crank`` takes one detent
    (+1 or -1) into the crank queue, like an encoder callback; without it the crank
    command is rejected. The server's thread calls all three, so they must not block.
    The socket gets ``mode``, and ``group`` when that group exists.
    """

    def __init__(
        self,
        path: str,
        *,
        snapshot: Callable[[], dict],
        post: Callable[[object], None],
        crank: Callable[[int], None] | None = None,
        group: str | None = "crankllm",
        mode: int = 0o660,
        max_connections: int = MAX_CONNECTIONS,
        request_timeout: float = REQUEST_TIMEOUT_S,
        tail_buffer: int = TAIL_BUFFER_BYTES,
        clock: Callable[[], float] = time.monotonic,
    ):
        if not path:
            raise ControlError("control socket path is empty; set [service] control_socket")
        if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o777:
            raise ControlError(f"invalid control socket mode {mode!r}; expected permission bits such as 0o660")
        for name, value in (("max_connections", max_connections), ("tail_buffer", tail_buffer)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ControlError(f"invalid control socket {name} {value!r}; expected an integer >= 1")
        if not request_timeout > 0:
            raise ControlError(f"invalid control socket request_timeout {request_timeout!r}; expected seconds > 0")

        self.path = path
        self.group = group
        self.mode = mode
        self.max_connections = max_connections
        self.request_timeout = request_timeout
        self.tail_buffer = tail_buffer
        self._snapshot = snapshot
        self._post = post
        self._crank = crank
        self._clock = clock

        # The lock guards what the worker thread touches: the story, the followers'
        # output buffers and the wake flag.
        self._lock = threading.Lock()
        self._story = _Story(REPLAY_MAX_CHARS)
        self._followers: set[_Connection] = set()
        self._wake_pending = False
        self._stopping = False

        self._connections: set[_Connection] = set()
        self._listener: socket.socket | None = None
        self._selector: selectors.BaseSelector | None = None
        self._wake_r = self._wake_w = -1
        self._identity: tuple[int, int] | None = None
        self._thread: threading.Thread | None = None
        self._at_limit = False
        self._accept_resume: float | None = None
        self.counts = dict.fromkeys(
            ("requests", "rejected", "over_limit", "timed_out", "tail_dropped"), 0
        )

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Create the socket (removing a stale one) and start serving."""
        if self._thread is not None:
            raise RuntimeError("control server already started")
        directory = os.path.dirname(self.path) or "."
        try:
            os.makedirs(directory, mode=0o755, exist_ok=True)
        except OSError as err:
            raise ControlError(
                f"creating folder {directory} for the control socket failed: {_reason(err)}"
            ) from err
        self._remove_stale_socket()

        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        bound = False
        try:
            try:
                listener.bind(self.path)
                bound = True
                # Permissions are set before listen(), so no client can connect
                # while the socket still has the umask's mode.
                os.chmod(self.path, self.mode)
                self._set_group()
                listener.listen(socket.SOMAXCONN)
            except OSError as err:
                if err.errno == errno.EADDRINUSE:
                    raise ControlError(
                        f"control socket {self.path} is in use: another crankllm is running? "
                        "Stop it first, or set [service] control_socket to another path"
                    ) from err
                raise ControlError(f"creating control socket {self.path} failed: {_reason(err)}") from err
            listener.setblocking(False)
            info = os.lstat(self.path)
            self._identity = (info.st_dev, info.st_ino)
            self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            self._selector = selectors.DefaultSelector()
            self._selector.register(listener, selectors.EVENT_READ, "listener")
            self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        except BaseException:
            listener.close()
            if bound:
                _unlink_quietly(self.path)
            self._close_wake_pipe()
            if self._selector is not None:
                self._selector.close()
                self._selector = None
            raise
        self._listener = listener
        self._thread = threading.Thread(target=self._serve, name="crankllm-control", daemon=True)
        self._thread.start()
        log.info("control socket listening on %s (mode %04o)", self.path, self.mode)

    def close(self, timeout: float = 5.0) -> None:
        """Tell tail clients that crankllm is stopping, close every connection and remove the socket."""
        thread = self._thread
        if thread is None:
            return
        with self._lock:
            self._stopping = True
            self._wake_locked()
        if thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                log.warning("control server did not stop within %.1f s", timeout)

    def _remove_stale_socket(self) -> None:
        try:
            info = os.lstat(self.path)
        except FileNotFoundError:
            return
        except OSError as err:
            raise ControlError(f"checking control socket {self.path} failed: {_reason(err)}") from err
        if not stat.S_ISSOCK(info.st_mode):
            raise ControlError(
                f"{self.path} exists and is not a socket; remove it or set "
                "[service] control_socket to another path"
            )

        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(PROBE_TIMEOUT_S)
        try:
            probe.connect(self.path)
        except ConnectionRefusedError:
            # Nothing listens: a crankllm that did not stop cleanly left it behind.
            _unlink_quietly(self.path)
            log.info("removed stale control socket %s", self.path)
            return
        except FileNotFoundError:
            return
        except TimeoutError:
            pass  # a listener whose backlog is full is alive too
        except OSError as err:
            raise ControlError(f"checking control socket {self.path} failed: {_reason(err)}") from err
        finally:
            probe.close()
        raise ControlError(
            f"control socket {self.path} is in use: another crankllm is running? "
            "Stop it first, or set [service] control_socket to another path"
        )

    def _set_group(self) -> None:
        if self.group is None:
            return
        try:
            gid = grp.getgrnam(self.group).gr_gid
        except KeyError:
            log.debug("group %s does not exist; control socket %s keeps its group", self.group, self.path)
            return
        try:
            os.chown(self.path, -1, gid)
        except PermissionError as err:
            log.warning(
                "cannot give control socket %s to group %s (%s); only its owner can use it",
                self.path, self.group, err.strerror,
            )

    # -- Mirror: called on the worker thread -----------------------------------------------
    # These hold the lock briefly and do no I/O except one byte to the wake-up pipe.

    def story_started(self, story_id: int, prompt: str) -> None:
        with self._lock:
            self._story.start(story_id, prompt)
            self._publish_locked({"event": "started", "story_id": story_id, "prompt": prompt})

    def text_added(self, text: str) -> None:
        with self._lock:
            self._story.add(text)
            self._publish_locked({"event": "added", "text": text})

    def text_removed(self, text: str) -> None:
        with self._lock:
            self._story.remove(len(text))
            self._publish_locked({"event": "removed", "text": text})

    def story_ended(self, reason: str) -> None:
        with self._lock:
            self._story.ended = reason
            self._publish_locked({"event": "ended", "story_id": self._story.story_id, "reason": reason})

    @property
    def followers(self) -> int:
        """Number of tail clients following the story."""
        with self._lock:
            return len(self._followers)

    def _publish_locked(self, event: dict) -> None:
        if not self._followers:
            return
        data = encode_message(event)
        for conn in list(self._followers):
            if len(conn.out) + len(data) > self.tail_buffer:
                self._drop_follower_locked(conn)
            else:
                conn.out += data
        self._wake_locked()

    def _drop_follower_locked(self, conn: _Connection) -> None:
        # The server thread may be sending from conn.out right now, so it replaces
        # the queued events with the notice itself (in _drain_wake).
        self._followers.discard(conn)
        conn.dropped = True

    def _wake_locked(self) -> None:
        if self._wake_pending or self._wake_w < 0:
            return
        self._wake_pending = True
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass  # the pipe is full, so the selector wakes anyway

    # -- the server thread ----------------------------------------------------------------

    def _serve(self) -> None:
        try:
            while True:
                events = self._selector.select(self._next_timeout())
                # Connections first: a client that closed before another connected
                # then frees its slot before the new connection is counted.
                events.sort(key=lambda event: event[0].data == "listener")
                for key, mask in events:
                    if key.data == "listener":
                        self._accept()
                    elif key.data == "wake":
                        self._drain_wake()
                    else:
                        self._service(key.data, mask)
                with self._lock:
                    stopping = self._stopping
                if stopping:
                    break
                self._expire()
        except Exception:
            log.exception("control server failed; `crankllm` commands will not work until a restart")
        finally:
            self._shutdown()

    def _next_timeout(self) -> float | None:
        deadlines = [conn.deadline for conn in self._connections if conn.deadline is not None]
        if self._accept_resume is not None:
            deadlines.append(self._accept_resume)
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - self._clock())

    def _accept(self) -> None:
        # One connection per round: the selector reports the listener again while
        # more wait, and closed connections are handled first in each round.
        try:
            sock, _ = self._listener.accept()
        except BlockingIOError:
            return
        except OSError as err:
            # EMFILE and similar leave the connection queued, so the listener
            # stays readable: pause accepting instead of spinning on it.
            log.error(
                "control socket %s: accept failed: %s; retrying in %.0f s",
                self.path, err, ACCEPT_RETRY_S,
            )
            self._selector.unregister(self._listener)
            self._accept_resume = self._clock() + ACCEPT_RETRY_S
            return
        sock.setblocking(False)
        if len(self._connections) >= self.max_connections:
            self._reject_over_limit(sock)
            return
        conn = _Connection(sock, self._clock() + self.request_timeout)
        self._connections.add(conn)
        self._selector.register(sock, selectors.EVENT_READ, conn)

    def _reject_over_limit(self, sock: socket.socket) -> None:
        self.counts["over_limit"] += 1
        if not self._at_limit:
            self._at_limit = True
            log.warning(
                "control socket %s: %d connections open; rejecting more until one closes",
                self.path, self.max_connections,
            )
        reply = encode_message({
            "ok": False,
            "error": f"crankllm is serving {self.max_connections} control connections; try again later",
        })
        try:
            sock.send(reply)
        except OSError:
            pass  # the client gets EOF instead of the message
        sock.close()

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        with self._lock:
            self._wake_pending = False
        for conn in list(self._connections):
            if conn.dropped and not conn.close_when_sent:
                self._send_drop_notice(conn)
            with self._lock:
                pending = bool(conn.out)
            if pending and not conn.writing:
                self._flush(conn)

    def _send_drop_notice(self, conn: _Connection) -> None:
        self.counts["tail_dropped"] += 1
        log.warning("dropped a tail client that fell %d KiB behind", self.tail_buffer // 1024)
        conn.close_when_sent = True
        conn.deadline = self._clock() + self.request_timeout
        notice = encode_message({
            "event": "dropped",
            "error": (
                f"this tail client fell more than {self.tail_buffer // 1024} KiB behind "
                "and was disconnected; run crankllm tail again"
            ),
        })
        with self._lock:
            # Keep the rest of a line already partly sent, so the client still reads
            # whole lines, and replace everything queued behind it with the notice.
            keep = 0 if conn.at_line_start else conn.out.find(b"\n") + 1
            del conn.out[keep:]
            conn.out += notice

    def _service(self, conn: _Connection, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            self._flush(conn)
        if mask & selectors.EVENT_READ and conn in self._connections:
            self._receive(conn)

    def _receive(self, conn: _Connection) -> None:
        try:
            data = conn.sock.recv(_RECV_CHUNK)
        except BlockingIOError:
            return
        except OSError as err:
            self._close(conn, f"receive failed: {err}")
            return
        if not data:
            if conn.following or conn.dropped:
                self._close(conn, "tail client disconnected")
            elif conn.close_when_sent:
                self._close(conn, "client closed before reading the whole reply")
            else:
                self._close(conn, "client disconnected before completing a request")
            return
        if conn.following or conn.dropped or conn.close_when_sent:
            return  # nothing more is expected from this client; the data is discarded

        conn.inbuf += data
        newline = conn.inbuf.find(b"\n", 0, MAX_REQUEST_BYTES)
        if newline < 0:
            if len(conn.inbuf) >= MAX_REQUEST_BYTES:
                self._reject(conn, ControlError(
                    f"request too long: no newline within {MAX_REQUEST_BYTES} bytes"
                ))
            return
        line = bytes(conn.inbuf[:newline])
        conn.inbuf.clear()
        self._handle(conn, line)

    def _handle(self, conn: _Connection, line: bytes) -> None:
        self.counts["requests"] += 1
        try:
            request = parse_request(line)
        except ControlError as err:
            self._reject(conn, err)
            return

        command = request["command"]
        log.debug("control request: %s", command)
        try:
            if command == "status":
                self._reply(conn, {"ok": True, "status": self._snapshot()})
            elif command == "prompt":
                self._post(_daemon_events().PromptRequest(request["text"]))
                log.info("prompt queued from the control socket (%d characters)", len(request["text"]))
                self._reply(conn, {"ok": True})
            elif command == "new":
                self._post(_daemon_events().NewStory())
                log.info("new story requested from the control socket")
                self._reply(conn, {"ok": True})
            elif command == "crank":
                self._turn(conn, request["detents"])
            else:
                self._follow(conn)
        except Exception as err:  # snapshot() and post() belong to the daemon; keep serving others
            log.exception("control request %s failed", command)
            self._reply(conn, {
                "ok": False,
                "error": f"{command} failed inside crankllm ({err}); see journalctl -u crankllm",
            })

    def _turn(self, conn: _Connection, detents: int) -> None:
        if self._crank is None:
            self._reject(conn, ControlError("this crankllm takes no crank commands"))
            return
        direction = 1 if detents > 0 else -1
        for _ in range(abs(detents)):
            self._crank(direction)
        log.info("crank command from the control socket: %+d detents", detents)
        self._reply(conn, {"ok": True})

    def _reject(self, conn: _Connection, err: ControlError) -> None:
        self.counts["rejected"] += 1
        log.info("rejected a control request (%d so far): %s", self.counts["rejected"], err)
        self._reply(conn, {"ok": False, "error": str(err)})

    def _reply(self, conn: _Connection, message: dict) -> None:
        conn.close_when_sent = True
        with self._lock:
            conn.out += encode_message(message)
        self._flush(conn)

    def _follow(self, conn: _Connection) -> None:
        conn.deadline = None
        conn.following = True
        with self._lock:
            conn.out += encode_message({"ok": True})
            for event in self._replay_locked():
                conn.out += encode_message(event)
            self._followers.add(conn)
            count = len(self._followers)
        log.info("tail client connected (%d following)", count)
        self._flush(conn)

    def _replay_locked(self) -> list[dict]:
        story = self._story
        if story.story_id is None:
            return []
        events = [{"event": "started", "story_id": story.story_id, "prompt": story.prompt}]
        if story.omitted:
            events.append({"event": "omitted", "chars": story.omitted})
        text = story.text()
        for start in range(0, len(text), REPLAY_CHUNK_CHARS):
            events.append({"event": "added", "text": text[start:start + REPLAY_CHUNK_CHARS]})
        if story.ended is not None:
            events.append({"event": "ended", "story_id": story.story_id, "reason": story.ended})
        return events

    def _flush(self, conn: _Connection) -> None:
        """Send what ``conn`` has queued without blocking; wait for EVENT_WRITE if the socket is full."""
        while True:
            with self._lock:
                chunk = bytes(conn.out[:_SEND_CHUNK])
            if not chunk:
                break
            try:
                sent = conn.sock.send(chunk)
            except BlockingIOError:
                sent = 0
            except OSError as err:
                self._close(conn, f"send failed: {err}")
                return
            with self._lock:
                del conn.out[:sent]
                if sent:
                    conn.at_line_start = chunk[sent - 1] == ord("\n")
            if sent < len(chunk):
                self._want_write(conn, True)
                return
        if conn.close_when_sent:
            self._close(conn, None)
        else:
            self._want_write(conn, False)

    def _want_write(self, conn: _Connection, enabled: bool) -> None:
        if conn.writing == enabled:
            return
        conn.writing = enabled
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if enabled else 0)
        self._selector.modify(conn.sock, events, conn)

    def _expire(self) -> None:
        now = self._clock()
        if self._accept_resume is not None and now >= self._accept_resume:
            self._accept_resume = None
            self._selector.register(self._listener, selectors.EVENT_READ, "listener")
        for conn in list(self._connections):
            if conn.deadline is not None and now >= conn.deadline:
                self.counts["timed_out"] += 1
                if conn.close_when_sent:
                    self._close(conn, "client did not read its reply in time")
                else:
                    self._reject(conn, ControlError(
                        f"request timed out: no complete request within {self.request_timeout:g} s"
                    ))

    def _close(self, conn: _Connection, reason: str | None) -> None:
        if conn not in self._connections:
            return
        self._connections.discard(conn)
        with self._lock:
            was_following = conn in self._followers
            self._followers.discard(conn)
            count = len(self._followers)
            conn.out.clear()
        if was_following:
            log.info("tail client disconnected (%d following)", count)
        elif reason:
            log.debug("control connection closed: %s", reason)
        self._selector.unregister(conn.sock)
        conn.sock.close()
        if self._at_limit and len(self._connections) < self.max_connections:
            self._at_limit = False
            log.info("control socket %s accepts connections again", self.path)

    def _shutdown(self) -> None:
        with self._lock:
            self._stopping = True
            followers = list(self._followers)
            for conn in followers:
                conn.out += encode_message({"event": "closed", "reason": "crankllm is stopping"})
        for conn in followers:
            # One non-blocking attempt: a client that does not read gets EOF only.
            with self._lock:
                data = bytes(conn.out)
            try:
                conn.sock.send(data)
            except OSError:
                pass
        for conn in list(self._connections):
            self._close(conn, "server stopping")
        self._selector.close()
        self._listener.close()
        self._close_wake_pipe()
        if self._identity is not None:
            try:
                info = os.lstat(self.path)
            except FileNotFoundError:
                info = None
            if info is not None and (info.st_dev, info.st_ino) == self._identity:
                _unlink_quietly(self.path)
        log.info("control socket %s closed", self.path)

    def _close_wake_pipe(self) -> None:
        with self._lock:
            r, w = self._wake_r, self._wake_w
            self._wake_r = self._wake_w = -1
        for fd in (r, w):
            if fd >= 0:
                os.close(fd)


def _daemon_events():
    # Imported on first use: control_client imports this module, and the daemon module
    # loads llama.cpp, which would slow down every `crankllm status` by a second or so.
    from appliance.service import daemon

    return daemon


def _reason(err: OSError) -> str:
    return err.strerror or str(err)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


__all__ = [
    "COMMANDS", "ControlServer", "MAX_PROMPT_CHARS", "MAX_REPLY_BYTES", "MAX_REQUEST_BYTES",
    "display_width", "encode_message", "parse_request", "printable", "validate_prompt",
]
