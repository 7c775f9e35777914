"""`crankllm run` as systemd runs it: a real notify socket, a pty crank, real signals."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from appliance.service.transcript import read_transcript

WATCHDOG_USEC = 500_000


class NotifySocket:
    """A bound AF_UNIX datagram socket that records every sd_notify message."""

    def __init__(self, address: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        bind_to = "\0" + address[1:] if address.startswith("@") else address
        self.sock.bind(bind_to)
        self.address = address
        self.messages: list[tuple[float, str]] = []
        self.arrived = threading.Condition()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self):
        while True:
            try:
                data = self.sock.recv(4096)
            except OSError:
                return
            with self.arrived:
                self.messages.append((time.monotonic(), data.decode("utf-8")))
                self.arrived.notify_all()

    def wait_for(self, fragment: str, timeout: float = 120.0) -> float:
        """Wait until a message containing ``fragment`` arrives; return its arrival time."""
        deadline = time.monotonic() + timeout
        with self.arrived:
            while True:
                for when, message in self.messages:
                    if fragment in message:
                        return when
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no notify message with {fragment!r}; got {self.texts()}")
                self.arrived.wait(left)

    def texts(self) -> list[str]:
        with self.arrived:
            return [m for _, m in self.messages]

    def count(self, fragment: str, start: float, end: float) -> int:
        with self.arrived:
            return sum(1 for when, m in self.messages if start <= when <= end and fragment in m)

    def close(self):
        self.sock.close()


class Box:
    """A `crankllm run` process with a serial pulse crank on a pty."""

    def __init__(self, tmp_path: Path, model: str, notify_address: str):
        self.master, slave = os.openpty()
        self.port = os.ttyname(slave)
        self.slave = slave
        self.transcripts = tmp_path / "transcripts"
        self.config = tmp_path / "crankllm.toml"
        self.config.write_text(
            f'[model]\npath = "{model}"\nn_ctx = 256\nseed = 7\n'
            '[crank]\nsource = "serial"\n'
            f'[serial]\nmode = "pulses"\nport = "{self.port}"\n'
            '[display]\ndriver = "dummy"\n'
            f'[transcripts]\ndir = "{self.transcripts}"\nfsync_interval = 1.0\n'
            f'[service]\ncontrol_socket = "{tmp_path / "control.sock"}"\n',
            encoding="utf-8",
        )
        env = {**os.environ, "NOTIFY_SOCKET": notify_address, "WATCHDOG_USEC": str(WATCHDOG_USEC)}
        env.pop("WATCHDOG_PID", None)
        env.pop("CRANKLLM_CONFIG", None)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "appliance", "run", "--config", str(self.config)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )

    def crank(self, line: str) -> None:
        os.write(self.master, (line + "\n").encode())

    def stop(self, sig=signal.SIGTERM, timeout: float = 60.0) -> int:
        self.process.send_signal(sig)
        try:
            self.process.wait(timeout)
        finally:
            os.close(self.master)
            os.close(self.slave)
        return self.process.returncode

    def stories(self):
        return [read_transcript(str(p)) for p in sorted(self.transcripts.glob("*.txt"))]


@pytest.fixture(params=["path", "abstract"])
def notify(request, tmp_path):
    if request.param == "path":
        address = str(tmp_path / "notify.sock")
    else:
        address = f"@crankllm-test-{os.getpid()}-{id(request)}"
    listener = NotifySocket(address)
    yield listener
    listener.close()


@pytest.fixture
def box(tmp_path, default_model, notify):
    running = Box(tmp_path, default_model, notify.address)
    yield running
    if running.process.poll() is None:
        running.process.kill()
        running.process.wait()


def test_ready_after_loading_and_warmup(box, notify):
    notify.wait_for("READY=1")
    texts = notify.texts()
    ready_index = next(i for i, m in enumerate(texts) if "READY=1" in m)
    before = texts[:ready_index]
    assert any("EXTEND_TIMEOUT_USEC=" in m for m in before)
    assert any("STATUS=loading model" in m for m in before)
    # READY=1 carries the status of a primed story: the prompt has been decoded.
    assert "story 1" in texts[ready_index]


def test_watchdog_pings_idle_and_cranking(box, notify):
    ready = notify.wait_for("READY=1")
    time.sleep(1.5)
    idle_pings = notify.count("WATCHDOG=1", ready, ready + 1.5)
    assert idle_pings >= 3

    # Pings come between decode steps, so the window is long enough to average out a
    # slow step on a busy machine. The requirement stays 2 pings per second.
    start = time.monotonic()
    while time.monotonic() - start < 3.0:
        box.crank("+1")
        time.sleep(0.02)
    cranking_pings = notify.count("WATCHDOG=1", start, start + 3.0)
    assert cranking_pings >= 6
    assert box.stop() == 0


def test_sigterm_mid_story_completes_transcript(box, notify):
    notify.wait_for("READY=1")
    for _ in range(20):
        box.crank("+1")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not (box.stories() and len(box.stories()[0].text) > 20):
        time.sleep(0.05)
    assert box.stop(signal.SIGTERM) == 0
    assert any("STOPPING=1" in m for m in notify.texts())
    stories = box.stories()
    assert len(stories) == 1
    assert stories[0].complete
    assert len(stories[0].text) > 20


def test_kill9_keeps_flushed_text(box, notify):
    notify.wait_for("READY=1")
    box.crank("+10")
    box.crank("P")
    box.crank("+15")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        stories = box.stories()
        if len(stories) == 2 and len(stories[1].text) > 10:
            break
        time.sleep(0.05)
    box.stop(signal.SIGKILL)
    first, second = box.stories()
    assert first.complete
    assert len(first.text) > 10
    assert not second.complete
    assert len(second.text) > 10


def run_with_config(tmp_path, text: str) -> subprocess.CompletedProcess:
    config = tmp_path / "bad.toml"
    config.write_text(text, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "CRANKLLM_CONFIG")}
    return subprocess.run(
        [sys.executable, "-m", "appliance", "run", "--config", str(config)],
        capture_output=True, text=True, timeout=60, env=env,
    )


@pytest.mark.parametrize(
    "text, fragments",
    [
        ('[crank]\npin_aa = "GPIO17"\n', ["pin_aa", "pin_a"]),
        ('[model]\nn_ctx = "big"\n', ["n_ctx", '"big"']),
        ('[model]\npath = "/nonexistent/model.gguf"\n', ["path", "/nonexistent/model.gguf"]),
        ('[display]\ndriver = "ssd9999"\n', ["driver", "ssd9999"]),
        ('[crank]\nreverse = "backwards"\n', ["reverse", "backwards"]),
        ("[model\n", ["line 1"]),
    ],
)
def test_config_error_exits_78(tmp_path, text, fragments):
    result = run_with_config(tmp_path, text)
    assert result.returncode == 78
    assert str(tmp_path / "bad.toml") in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr


def test_config_check_command(tmp_path):
    config = tmp_path / "good.toml"
    config.write_text('[model]\nn_ctx = 256\n', encoding="utf-8")
    good = subprocess.run(
        [sys.executable, "-m", "appliance", "config", "check", "--config", str(config)],
        capture_output=True, text=True, timeout=60,
    )
    assert good.returncode == 0
    config.write_text('[model]\nn_ctx = -1\n', encoding="utf-8")
    bad = subprocess.run(
        [sys.executable, "-m", "appliance", "config", "check", "--config", str(config)],
        capture_output=True, text=True, timeout=60,
    )
    assert bad.returncode == 78
    assert "n_ctx" in bad.stderr


def test_config_check_reads_model_file(tmp_path):
    model = tmp_path / "notes.gguf"
    model.write_text("hello, not a model", encoding="utf-8")
    config = tmp_path / "crankllm.toml"
    config.write_text(f'[model]\npath = "{model}"\n', encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "appliance", "config", "check", "--config", str(config)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 78
    assert f"not a GGUF file: {model}" in result.stderr


def test_hung_decode_stops_watchdog(tmp_path, default_model, monkeypatch):
    from gpiozero.pins.mock import MockFactory

    from appliance.config import load_config
    from appliance.engine.engine import Engine
    from appliance.service.notify import Notifier
    from appliance.service.runner import assemble

    listener = NotifySocket(str(tmp_path / "notify.sock"))
    release = threading.Event()
    entered = threading.Event()
    real_step = Engine.step
    calls = []

    def step_that_hangs(self):
        calls.append(1)
        if len(calls) == 3:
            entered.set()
            release.wait(30)
        return real_step(self)

    monkeypatch.setattr(Engine, "step", step_that_hangs)
    config = load_config(
        None,
        env={},
        overrides={
            "model": {"path": default_model, "n_ctx": 256},
            "crank": {"pin_factory": "mock"},
            "display": {"driver": "dummy"},
            "transcripts": {"enabled": False},
        },
    )
    notifier = Notifier({"NOTIFY_SOCKET": listener.address, "WATCHDOG_USEC": str(WATCHDOG_USEC)})
    appliance = assemble(config, notifier=notifier, pin_factory=MockFactory())
    try:
        listener.wait_for("READY=1")
        appliance.crank.driver.turn_cw(5)
        assert entered.wait(30)
        hung_at = time.monotonic()
        time.sleep(1.5)
        assert listener.count("WATCHDOG=1", hung_at + 0.3, hung_at + 1.5) == 0
        release.set()
        appliance.daemon.sync(30)
        resumed = time.monotonic()
        time.sleep(0.8)
        assert listener.count("WATCHDOG=1", resumed, resumed + 0.8) >= 2
    finally:
        release.set()
        appliance.daemon.stop()
        appliance.close()
        listener.close()


def test_sighup_reloads_config(box, notify):
    notify.wait_for("READY=1")
    text = box.config.read_text(encoding="utf-8")
    box.config.write_text(text.replace("[crank]", "[crank]\nbogus_key = 1\n", 1), encoding="utf-8")
    box.process.send_signal(signal.SIGHUP)
    time.sleep(1.0)
    box.config.write_text(text.replace("n_ctx = 256", "n_ctx = 128"), encoding="utf-8")
    box.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(box.stories()) < 2:
        time.sleep(0.05)
    assert box.stop() == 0
    log = box.process.stderr.read()
    assert "reload failed, keeping the running configuration" in log
    assert "bogus_key" in log
    assert "model settings changed: reloading the model" in log
    assert box.process.returncode == 0
