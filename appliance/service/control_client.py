"""Client side of the control socket, for `crankllm status|prompt|new|tail`.

Each function opens one connection, sends one request line and reads the reply.
Errors are raised as ControlError, with a message meant for the person at the
terminal. The protocol is in docs/control-protocol.md.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from typing import TextIO

from appliance.errors import ControlError
from appliance.service.control import (
    MAX_REPLY_BYTES,
    display_width,
    encode_message,
    printable,
    validate_prompt,
)

# The systemd service's socket, in its RuntimeDirectory=crankllm (systemd/crankllm.service).
SERVICE_SOCKET = "/run/crankllm/control.sock"
# Seconds to wait for the daemon's reply to status, prompt and new. The daemon
# replies from its own thread, so only a hung daemon takes this long.
REPLY_TIMEOUT_S = 10.0


def default_socket(config, *, service_socket: str = SERVICE_SOCKET) -> str:
    """Return the control socket the commands use when no --socket is given.

    That is [service] control_socket if the configuration sets it, else the service's
    socket if it exists, else the path a `crankllm run` started by hand listens on.
    The service's socket comes before $XDG_RUNTIME_DIR because an ssh session has a
    runtime folder of its own, which the service does not use.
    """
    if config.service.control_socket:
        return config.effective_control_socket
    if os.path.exists(service_socket):
        return service_socket
    return config.effective_control_socket


def status(path: str, *, timeout: float = REPLY_TIMEOUT_S) -> dict:
    """Return the daemon's state: model, story, tokens, speed, detents and display."""
    reply = _request(path, {"command": "status"}, timeout)
    state = reply.get("status")
    if not isinstance(state, dict):
        raise ControlError(f"invalid reply from crankllm on {path}: status is missing")
    return state


def send_prompt(path: str, text: str, *, timeout: float = REPLY_TIMEOUT_S) -> None:
    """Queue ``text`` as the prompt of the next story."""
    validate_prompt(text)
    _request(path, {"command": "prompt", "text": text}, timeout)


def new_story(path: str, *, timeout: float = REPLY_TIMEOUT_S) -> None:
    """Start the story again from its prompt."""
    _request(path, {"command": "new"}, timeout)


def crank(path: str, detents: int, *, timeout: float = REPLY_TIMEOUT_S) -> None:
    """Turn the crank by ``detents`` (negative turns back), as if by hand."""
    _request(path, {"command": "crank", "detents": detents}, timeout)


def tail(
    path: str,
    out: TextIO | None = None,
    *,
    terminal: bool | None = None,
    timeout: float = REPLY_TIMEOUT_S,
) -> None:
    """Print the current story, then follow new text until crankllm stops.

    A rewind erases characters with backspaces when ``out`` is a terminal and
    prints a marker line otherwise; ``terminal`` overrides the ``isatty()`` check.
    Returns when crankllm stops; raises ControlError if the connection is lost.
    """
    out = sys.stdout if out is None else out
    if terminal is None:
        terminal = out.isatty()
    printer = _TailPrinter(out, terminal)

    sock = _connect(path, timeout)
    with sock:
        reader = sock.makefile("rb")
        _send(sock, path, {"command": "tail"})
        _check_reply(path, _read_message(reader, path))
        sock.settimeout(None)  # the story may stay idle for hours
        while True:
            try:
                event = _read_message(reader, path, closed=f"lost the connection to crankllm on {path}")
            except ControlError:
                printer.end_line()
                raise
            if not printer.show(event):
                return


def format_status(state: dict) -> str:
    """Format a status dict as aligned "name: value" lines for `crankllm status`."""
    rows = [
        ("state", state.get("state", "unknown")),
        ("model", state.get("model") or "none loaded"),
        ("bits per weight", _number(state.get("bits_per_weight"), "{:.2f}")),
        ("story", state.get("story_id", "unknown")),
        ("tokens", _tokens(state)),
        ("speed", _speed(state)),
        ("detents", _detents(state.get("detents"))),
        ("display", state.get("display", "unknown")),
    ]
    listed = {"state", "model", "bits_per_weight", "story_id", "tokens", "ctx_used", "n_ctx",
             "tokens_per_s", "ms_per_step", "detents", "display"}
    rows += [(key.replace("_", " "), value) for key, value in state.items() if key not in listed]
    width = max(len(name) for name, _ in rows) + 1
    return "\n".join(f"{name + ':':<{width}} {value}" for name, value in rows)


# -- status formatting ------------------------------------------------------------------


def _number(value, pattern: str) -> str:
    return pattern.format(value) if isinstance(value, (int, float)) else "unknown"


def _tokens(state: dict) -> str:
    text = str(state.get("tokens", "unknown"))
    if state.get("n_ctx"):
        text += f" (context {state.get('ctx_used', 0)} of {state['n_ctx']})"
    return text


def _speed(state: dict) -> str:
    rate = _number(state.get("tokens_per_s"), "{:.1f}")
    step = _number(state.get("ms_per_step"), "{:.1f}")
    return f"{rate} tok/s, {step} ms per step"


def _detents(counters) -> str:
    if not isinstance(counters, dict):
        return "unknown"
    return ", ".join(f"{name} {value}" for name, value in counters.items())


# -- tail output ------------------------------------------------------------------------


class _TailPrinter:
    """Write tail events to a text stream; story boundaries go on lines of their own."""

    def __init__(self, out: TextIO, terminal: bool):
        self.out = out
        self.terminal = terminal
        self.at_line_start = True
        self.story_id = None

    def show(self, event: dict) -> bool:
        """Print one event; return False once the stream has ended."""
        kind = event.get("event")
        if kind == "added":
            self.write(printable(str(event.get("text", ""))))
        elif kind == "removed":
            self.erase(printable(str(event.get("text", ""))))
        elif kind == "started":
            self.story_id = event.get("story_id")
            prompt = " ".join(str(event.get("prompt", "")).split())
            self.line(f"--- story {self.story_id}: {printable(prompt)} ---")
        elif kind == "ended":
            self.line(f"--- story {event.get('story_id', self.story_id)} ended: {event.get('reason', '')} ---")
        elif kind == "omitted":
            self.line(f"[{event.get('chars', 0)} earlier characters not shown]")
        elif kind == "closed":
            self.line(f"--- {event.get('reason', 'crankllm closed the connection')} ---")
            return False
        elif kind == "dropped":
            self.end_line()
            raise ControlError(str(event.get("error", "crankllm dropped this tail client")))
        # Unknown events come from a newer daemon and are skipped.
        return True

    def write(self, text: str) -> None:
        if not text:
            return
        self.out.write(text)
        self.out.flush()
        self.at_line_start = text.endswith("\n")

    def erase(self, text: str) -> None:
        # Backspace cannot move up a line, and a tab's width depends on the column.
        if self.terminal and "\n" not in text and "\t" not in text:
            self.write("\b \b" * display_width(text))
        else:
            self.line(f"[rewound {len(text)} characters]")

    def line(self, text: str) -> None:
        self.end_line()
        self.write(text + "\n")

    def end_line(self) -> None:
        if not self.at_line_start:
            self.write("\n")


# -- transport --------------------------------------------------------------------------


def _request(path: str, request: dict, timeout: float) -> dict:
    sock = _connect(path, timeout)
    with sock:
        reader = sock.makefile("rb")
        _send(sock, path, request)
        return _check_reply(path, _read_message(reader, path))


def _connect(path: str, timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except FileNotFoundError:
        sock.close()
        raise ControlError(
            f"crankllm is not running (no control socket at {path}); "
            "start it with sudo systemctl start crankllm"
        ) from None
    except ConnectionRefusedError:
        sock.close()
        raise ControlError(
            f"crankllm is not running (nothing listens on {path}); "
            "start it with sudo systemctl start crankllm"
        ) from None
    except PermissionError:
        sock.close()
        raise ControlError(
            f"permission denied on {path}: add yourself to the crankllm group "
            "(sudo usermod -aG crankllm $USER, then log in again)"
        ) from None
    except TimeoutError:
        sock.close()
        raise ControlError(f"crankllm on {path} did not accept the connection within {timeout:g} s") from None
    except OSError as err:
        sock.close()
        raise ControlError(f"connecting to crankllm on {path} failed: {err.strerror or err}") from None
    return sock


def _send(sock: socket.socket, path: str, request: dict) -> None:
    try:
        sock.sendall(encode_message(request))
    except (BrokenPipeError, ConnectionResetError):
        # The server may have replied and closed first, as it does when it is
        # serving its maximum number of connections. The reply read next gives the reason.
        pass
    except TimeoutError:
        raise ControlError(f"crankllm on {path} did not take the request in time") from None
    except OSError as err:
        raise ControlError(f"sending to crankllm on {path} failed: {err.strerror or err}") from None


def _read_message(reader, path: str, *, closed: str | None = None) -> dict:
    try:
        line = reader.readline(MAX_REPLY_BYTES + 1)
    except TimeoutError:
        raise ControlError(f"no reply from crankllm on {path}; check systemctl status crankllm") from None
    except OSError as err:
        raise ControlError(f"reading from crankllm on {path} failed: {err.strerror or err}") from None
    if not line:
        raise ControlError(closed or f"crankllm closed the connection on {path} without a reply")
    if not line.endswith(b"\n"):
        if len(line) > MAX_REPLY_BYTES:
            raise ControlError(f"reply from crankllm on {path} is longer than {MAX_REPLY_BYTES} bytes")
        raise ControlError(f"crankllm closed the connection on {path} in the middle of a reply")
    try:
        message = json.loads(line.decode("utf-8", "replace"))
    except json.JSONDecodeError as err:
        raise ControlError(f"invalid reply from crankllm on {path}: {err.msg}") from None
    if not isinstance(message, dict):
        raise ControlError(f"invalid reply from crankllm on {path}: not a JSON object")
    return message


def _check_reply(path: str, reply: dict) -> dict:
    if reply.get("ok") is True:
        return reply
    raise ControlError(str(reply.get("error") or f"crankllm on {path} rejected the request"))


__all__ = [
    "default_socket", "format_status", "new_story", "send_prompt", "status", "tail",
    "REPLY_TIMEOUT_S", "SERVICE_SOCKET",
]
