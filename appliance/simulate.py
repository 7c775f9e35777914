"""`crankllm simulate`: the real daemon with MockFactory pins and an emulated display.

Everything above the pins and the display bus is the code that runs on the Pi: config,
crank decoder, event queue, engine, display layout and render thread, transcripts. The
crank is turned by the keyboard, or by a script such as "40cw,5ccw,press,30cw".
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import select
import sys
import termios
import time
import tty
from dataclasses import dataclass

from appliance import models
from appliance.config import load_config
from appliance.errors import ConfigError
from appliance.service.daemon import Daemon
from appliance.service.runner import Appliance, assemble

log = logging.getLogger(__name__)

DISPLAY_CHOICES = "gif:PATH, png:PATH, terminal or dummy"
_SCRIPT_ITEM = re.compile(r"^(\d+)\s*(cw|ccw)$|^(press|longpress|long)$|^wait:(\d+(?:\.\d+)?)$")


@dataclass(frozen=True)
class Action:
    """One item of a crank script: ``count`` detents in ``kind`` "cw"/"ccw", a press, or a wait."""

    kind: str
    count: int = 1
    seconds: float = 0.0


def parse_script(text: str) -> list[Action]:
    """Parse "40cw,5ccw,press,longpress,wait:1.5" into actions; raise ConfigError naming the bad item."""
    actions = []
    for raw in text.split(","):
        item = raw.strip().lower()
        if not item:
            continue
        match = _SCRIPT_ITEM.match(item)
        if not match:
            raise ConfigError(
                f"invalid crank script item {raw.strip()!r}; expected NCW, NCCW, press, "
                "longpress or wait:SECONDS, e.g. \"40cw,5ccw,press,30cw\""
            )
        if match.group(2):
            actions.append(Action(match.group(2), int(match.group(1))))
        elif match.group(3):
            actions.append(Action("long" if match.group(3).startswith("long") else "press"))
        else:
            actions.append(Action("wait", seconds=float(match.group(4))))
    if not actions:
        raise ConfigError("the crank script is empty; give at least one item, e.g. \"20cw\"")
    return actions


def parse_display(text: str) -> dict:
    """Turn --display's value into open_display overrides."""
    kind, _, path = text.partition(":")
    if kind in ("gif", "png"):
        if not path:
            raise ConfigError(f"--display {text!r} needs a file, e.g. {kind}:story.{kind}")
        return {"driver": kind, "output": path}
    if kind in ("terminal", "dummy") and not path:
        return {"driver": kind}
    raise ConfigError(f"invalid --display {text!r}; expected {DISPLAY_CHOICES}")


class ScriptedCrank:
    """Turn the mock crank through a script at a given pace.

    ``interval`` is the time between detents (from rpm and detents per revolution);
    0 runs in lockstep: each detent is handled by the engine before the next one is
    made, which makes runs repeatable.
    """

    def __init__(self, driver, daemon: Daemon, *, interval: float):
        self.driver = driver
        self.daemon = daemon
        self.interval = interval

    def _pace(self) -> None:
        if self.interval > 0:
            time.sleep(self.interval)
        else:
            self.daemon.sync()

    def run(self, actions: list[Action]) -> None:
        for action in actions:
            if action.kind == "cw":
                for _ in range(action.count):
                    self.driver.turn_cw(1)
                    self._pace()
            elif action.kind == "ccw":
                for _ in range(action.count):
                    self.driver.turn_ccw(1)
                    self._pace()
            elif action.kind == "press":
                self.driver.press()
                self._pace()
            elif action.kind == "long":
                self.driver.long_press()
                self._pace()
            else:
                time.sleep(action.seconds)
        self.daemon.sync()


class KeyboardCrank:
    """Turn the mock crank from the keyboard: arrows or space turn, Enter presses, q quits.

    Holding a key cranks continuously through the terminal's key repeat.
    """

    KEYS = "→/space: clockwise  ←: back  Enter: next prompt  l: new story  q: quit"

    def __init__(self, driver, stream=None):
        self.driver = driver
        self.stream = stream or sys.stdin

    def run(self) -> None:
        fd = self.stream.fileno()
        saved = termios.tcgetattr(fd)
        try:
            tty.setcbreak(fd)
            while True:
                key = os.read(fd, 1)
                if key in (b"q", b"Q", b"\x04"):
                    return
                if key == b" ":
                    self.driver.turn_cw(1)
                elif key in (b"\r", b"\n"):
                    self.driver.press()
                elif key in (b"l", b"L"):
                    self.driver.long_press()
                elif key == b"\x1b":
                    self._escape(fd)
        finally:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)

    def _escape(self, fd: int) -> None:
        ready, _, _ = select.select([fd], [], [], 0.05)
        if not ready:
            return
        sequence = os.read(fd, 2)
        if sequence == b"[C":
            self.driver.turn_cw(1)
        elif sequence == b"[D":
            self.driver.turn_ccw(1)


@contextlib.contextmanager
def _logging_to_file(path):
    """Send the root logger's records to ``path`` meanwhile, then restore its handlers."""
    root = logging.getLogger()
    saved = list(root.handlers)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.handlers[:] = [handler]
    try:
        yield
    finally:
        root.handlers[:] = saved
        handler.close()


def _check_writable_directory(path: str) -> None:
    """Create ``path`` if needed; raise ConfigError when transcripts cannot be written there."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot create the transcript folder {path}: {err.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"the transcript folder {path} is not writable; pass another --transcript")


def summary(appliance: Appliance) -> str:
    daemon = appliance.daemon
    counters = appliance.queue.counters()
    stats = daemon.stats
    per_step = stats.decode_ms_total / stats.steps if stats.steps else 0.0
    info = daemon.engine.model_info if daemon.engine else None
    bits = f"{info.bits_per_weight:.2f} ({info.file_type})" if info else "n/a"
    return "\n".join([
        f"detents:          {counters.received} received, {counters.generated} stepped, "
        f"{counters.rewound} rewound, {counters.cancelled} cancelled, {counters.dropped} dropped, "
        f"{counters.ignored} ignored",
        f"tokens:           {stats.tokens} generated, {stats.rewound_tokens} rewound, "
        f"{stats.story_id} stories, {stats.steps_after_end} steps after a story's end "
        "(no token)",
        f"decode:           {per_step:.1f} ms per step",
        f"model:            {daemon.model_path}",
        f"bits per weight:  {bits}",
    ])


def run(args) -> int:
    from gpiozero.pins.mock import MockFactory

    overrides: dict[str, dict] = {"crank": {"pin_factory": "mock", "source": "gpio"}}
    if args.seed is not None:
        overrides["model"] = {"seed": args.seed}
    config = load_config(args.config, overrides=overrides)
    interactive = args.script is None
    if args.rpm < 0:
        raise ConfigError(f"invalid --rpm {args.rpm:g}: expected 0 (lockstep) or more revolutions per minute")
    if args.detents_per_rev < 1:
        raise ConfigError(f"invalid --detents-per-rev {args.detents_per_rev}: expected 1 or more")
    if args.transcript:
        _check_writable_directory(args.transcript)
    if args.display:
        display = parse_display(args.display)
    elif interactive and sys.stdout.isatty():
        display = {"driver": "terminal"}
    else:
        display = {"driver": "dummy"}
    actions = None if interactive else parse_script(args.script)
    if interactive and not sys.stdin.isatty():
        raise ConfigError("simulate needs a terminal for the keyboard crank; pass --script for scripted runs")
    if not config.model.path:
        # Prepared here, before the emulated OLED takes over the terminal.
        models.ensure_default_model()

    # Log lines printed under the in-place frame would be overwritten by its next
    # redraw, so the keyboard simulator logs to a file and shows the keys above it.
    on_terminal = interactive and display["driver"] == "terminal"
    log_path = models.user_model_dir().parent / "simulate.log"
    with _logging_to_file(log_path) if on_terminal else contextlib.nullcontext():
        if on_terminal:
            print(f"{KeyboardCrank.KEYS}\n(log: {log_path})", file=sys.stderr)
        appliance = assemble(
            config,
            pin_factory=MockFactory(),
            display_overrides=display,
            transcripts_dir=args.transcript,
            prepare_missing_model=True,
        )
        try:
            driver = appliance.crank.driver
            if interactive:
                if not on_terminal:
                    print(KeyboardCrank.KEYS, file=sys.stderr)
                KeyboardCrank(driver).run()
            else:
                rate = args.rpm * args.detents_per_rev / 60.0
                ScriptedCrank(driver, appliance.daemon, interval=1.0 / rate if rate > 0 else 0.0).run(actions)
            if appliance.display is not None:
                appliance.display.flush(timeout=10)
            appliance.daemon.stop()
            appliance.daemon.join()
        finally:
            appliance.close()
    print(summary(appliance))
    if args.print_story and appliance.daemon.engine is not None:
        print("\nstory:\n" + appliance.daemon.engine.text)
    return 0
