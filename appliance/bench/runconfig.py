"""The config file the benchmark gives both the in-process daemon and `crankllm run`.

Every hardware edge is swapped for the fake that ships with crankllm: MockFactory pins
for the crank and a bus-level fake SSD1306 that counts bytes for the display. The
control socket and transcripts go to the benchmark's temporary folder. Everything
else keeps its built-in default, with two exceptions. The seed is fixed, so the
reference and the daemon sample the same tokens. ``end_policy`` is "restart", so a
story that ends keeps every later detent a real decode step instead of a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

# Any fixed seed works; this one is only required to be the same on both sides.
SEED = 1234


@dataclass(frozen=True)
class RunConfig:
    """The written config file's path and the values it sets."""

    path: str
    model_path: str
    n_threads: int
    prompt_format: str
    transcripts_dir: str
    control_socket: str


def _toml_string(text: str) -> str:
    escaped = []
    for char in text:
        if char in '"\\':
            escaped.append("\\" + char)
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            escaped.append(f"\\u{ord(char):04X}")
        else:
            escaped.append(char)
    return '"' + "".join(escaped) + '"'


def write_config(directory: str, *, model_path: str, n_threads: int, prompt_format: str) -> RunConfig:
    """Write ``crankllm.toml`` into ``directory`` and return what it sets."""
    transcripts = os.path.join(directory, "transcripts")
    control = os.path.join(directory, "control.sock")
    path = os.path.join(directory, "crankllm.toml")
    lines = [
        "# Written by `crankllm bench`: fake pins and display, fixed seed.",
        "[model]",
        f"path = {_toml_string(model_path)}",
        f"prompt_format = {_toml_string(prompt_format)}",
        f"n_threads = {n_threads}",
        f"seed = {SEED}",
        'end_policy = "restart"',
        "",
        "[crank]",
        'pin_factory = "mock"',
        "",
        "[display]",
        'driver = "ssd1306"',
        'interface = "fake"',
        "",
        "[transcripts]",
        f"dir = {_toml_string(transcripts)}",
        "",
        "[service]",
        f"control_socket = {_toml_string(control)}",
        "",
    ]
    with open(path, "w", encoding="utf-8") as file:
        file.write("\n".join(lines))
    return RunConfig(path=path, model_path=model_path, n_threads=n_threads, prompt_format=prompt_format,
                     transcripts_dir=transcripts, control_socket=control)
