"""Route llama.cpp's log output into Python logging.

llama.cpp and ggml print through one callback; without it they write to the process's
stderr. Importing llama_cpp installs llama-cpp-python's own callback, which prints to
stderr too, so ``install()`` replaces it. The process's file descriptors are never
redirected.
"""

from __future__ import annotations

import ctypes
import logging
import re
import threading
from collections.abc import Callable

import llama_cpp

log = logging.getLogger("appliance.llama_cpp")

# enum ggml_log_level in ggml.h (llama.cpp as vendored by llama-cpp-python 0.3.36).
# INFO is llama.cpp's chatter (tensor lists, buffer sizes), so it goes to debug.
_LEVELS = {
    0: logging.DEBUG,  # NONE
    1: logging.DEBUG,  # DEBUG
    2: logging.DEBUG,  # INFO
    3: logging.WARNING,  # WARN
    4: logging.ERROR,  # ERROR
}
_CONT = 5

_lock = threading.Lock()
_pending: list[str] = []
_pending_level = logging.DEBUG
_listeners: list[Callable[[str], None]] = []
_callback = None
_quiet = 0


def _emit(line: str, level: int) -> None:
    for listener in list(_listeners):
        listener(line)
    log.log(logging.DEBUG if _quiet else level, "%s", line)


def _on_log(level: int, text: bytes, _user_data) -> None:
    global _pending_level
    chunk = (text or b"").decode("utf-8", errors="replace")
    with _lock:
        if level != _CONT:
            _pending_level = _LEVELS.get(level, logging.DEBUG)
        _pending.append(chunk)
        joined = "".join(_pending)
        if "\n" not in joined:
            return
        *lines, rest = joined.split("\n")
        _pending[:] = [rest] if rest else []
        level_now = _pending_level
    for line in lines:
        if line.strip():
            _emit(line.rstrip(), level_now)


def install() -> None:
    """Point llama.cpp's log callback at this module (idempotent)."""
    global _callback
    if _callback is None:
        # The ctypes function object must outlive every call from C, so it is kept in
        # a module global for the life of the process.
        _callback = llama_cpp.llama_log_callback(_on_log)
        llama_cpp.llama_log_set(_callback, ctypes.c_void_p(0))


class listening:
    """Context manager that passes every llama.cpp log line to ``listener`` meanwhile.

    With ``quiet``, warnings are logged at debug level meanwhile: the quantizer warns
    once per tensor that falls back, which the caller summarises in one line instead.
    """

    def __init__(self, listener: Callable[[str], None], *, quiet: bool = False):
        self.listener = listener
        self.quiet = quiet

    def __enter__(self):
        global _quiet
        install()
        _listeners.append(self.listener)
        if self.quiet:
            _quiet += 1
        return self

    def __exit__(self, *exc):
        global _quiet
        _listeners.remove(self.listener)
        if self.quiet:
            _quiet -= 1
        return False


# "[  12/ 272]  blk.1.attn_k.weight ..." is how llama_model_quantize reports each tensor.
QUANTIZE_PROGRESS = re.compile(r"^\[\s*(\d+)\s*/\s*(\d+)\s*\]")
# "... WARNING: 180 of 272 tensor(s) required fallback quantization"
QUANTIZE_FALLBACK = re.compile(r"(\d+) of (\d+) tensor\(s\) required fallback")
