"""The daemon loop in process, on the tiny Q2_K model: stories, reloads, messages."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pytest

from appliance.config import load_config
from appliance.crank.events import CrankQueue, Press, Rewind, Step
from appliance.errors import ConfigError
from appliance.service.daemon import Daemon, NewStory, PromptRequest, Reload


@dataclass
class Stats:
    reconnects: int = 0
    connected: bool = True
    frames_sent: int = 0
    bytes_sent: int = 0
    errors: int = 0


class RecordingDisplay:
    """Keeps every state the daemon hands over; reports reconnects as the test sets them."""

    def __init__(self):
        self.states = []
        self.stats = Stats()
        self.wakes = 0

    def update(self, state):
        self.states.append(state)

    def activity(self):
        self.wakes += 1


class RecordingMirror:
    def __init__(self):
        self.events = []

    def story_started(self, story_id, prompt):
        self.events.append(("start", story_id, prompt))

    def text_added(self, text):
        self.events.append(("text", text))

    def text_removed(self, text):
        self.events.append(("removed", text))

    def story_ended(self, reason):
        self.events.append(("end", reason))


def make_config(model, **model_settings):
    return load_config(
        None,
        env={},
        overrides={
            "model": {"path": model, "prompt_format": "raw", "n_ctx": 128, "seed": 5, **model_settings},
            "crank": {"pin_factory": "mock"},
            "display": {"driver": "dummy"},
            "prompts": {"list": ["the crank turns", "the lamp"]},
        },
    )


@pytest.fixture
def running(tiny_model):
    started = []

    def start(config=None, loader=None):
        queue = CrankQueue()
        display = RecordingDisplay()
        mirror = RecordingMirror()
        daemon = Daemon(
            config or make_config(tiny_model), queue=queue, display=display,
            mirrors=[mirror], config_loader=loader,
        )
        daemon.start()
        started.append(daemon)
        return daemon, display, mirror

    yield start
    for daemon in started:
        daemon.stop()
        daemon.join(30)


def test_steps_reach_display_and_mirror(running):
    daemon, display, mirror = running()
    daemon.post(Step(1))
    daemon.post(Step(1))
    assert daemon.sync(30)
    assert daemon.engine.n_generated == 2
    assert display.states[-1].tokens == 2
    assert display.states[-1].text == daemon.engine.text
    added = "".join(e[1] for e in mirror.events if e[0] == "text")
    assert added == daemon.engine.text


def test_rewind_reports_removed_text(running):
    daemon, display, mirror = running()
    for _ in range(6):
        daemon.post(Step(1))
    daemon.post(Rewind(2))
    assert daemon.sync(30)
    assert daemon.engine.n_generated == 4
    added = "".join(e[1] for e in mirror.events if e[0] == "text")
    removed = "".join(e[1] for e in mirror.events if e[0] == "removed")
    assert added[: len(added) - len(removed)] == daemon.engine.text
    assert daemon.stats.rewound_tokens == 2


def test_short_press_cycles_prompts(running):
    daemon, _, mirror = running()
    daemon.post(Press(long=False))
    assert daemon.sync(30)
    starts = [e for e in mirror.events if e[0] == "start"]
    assert starts[-1][2] == "the lamp"
    assert ("end", "new story") in mirror.events


def test_long_press_restarts_same_prompt(running):
    daemon, _, mirror = running()
    daemon.post(Step(1))
    daemon.post(Press(long=True))
    assert daemon.sync(30)
    starts = [e for e in mirror.events if e[0] == "start"]
    assert [s[2] for s in starts] == ["the crank turns", "the crank turns"]
    assert daemon.engine.n_generated == 0


def test_prompt_request_starts_story(running):
    daemon, _, mirror = running()
    daemon.post(PromptRequest("a bird"))
    daemon.post(NewStory())
    assert daemon.sync(30)
    starts = [e[2] for e in mirror.events if e[0] == "start"]
    assert starts == ["the crank turns", "a bird", "a bird"]


def test_overlong_prompt_falls_back(running):
    daemon, display, mirror = running()
    daemon.post(PromptRequest("word " * 400))
    assert daemon.sync(30)
    starts = [e[2] for e in mirror.events if e[0] == "start"]
    assert starts[-1] == "the crank turns"
    assert display.states[-1].message == "prompt too long"


def test_display_back_message(running):
    daemon, display, _ = running()
    display.stats.reconnects = 1
    daemon.post(Step(1))
    assert daemon.sync(30)
    assert any(state.message == "display back" for state in display.states)


def test_reload_same_model_keeps_engine(running, tiny_model):
    daemon, _, _ = running(loader=lambda: make_config(tiny_model))
    engine = daemon.engine
    daemon.post(Reload())
    assert daemon.sync(30)
    assert daemon.engine is engine


def test_reload_changed_model_settings(running, tiny_model):
    daemon, _, mirror = running(loader=lambda: make_config(tiny_model, n_ctx=96))
    engine = daemon.engine
    daemon.post(Reload())
    assert daemon.sync(30)
    assert daemon.engine is not engine
    assert daemon.engine.n_ctx == 96
    assert ("end", "reload") in mirror.events


def test_reload_invalid_config_keeps_running(running, tiny_model, caplog):
    def broken():
        raise ConfigError("/etc/crankllm/conf.d/99.toml: [model] n_ctx = -1: too small")

    daemon, _, _ = running(loader=broken)
    engine = daemon.engine
    with caplog.at_level(logging.ERROR):
        daemon.post(Reload())
        assert daemon.sync(30)
    assert daemon.engine is engine
    assert "keeping the running configuration" in caplog.text
    daemon.post(Step(1))
    assert daemon.sync(30)
    assert daemon.engine.n_generated == 1


def test_snapshot_fields(running):
    daemon, _, _ = running()
    daemon.post(Step(1))
    assert daemon.sync(30)
    snapshot = daemon.snapshot()
    assert snapshot["state"] == "ready"
    assert snapshot["tokens"] == 1
    assert snapshot["bits_per_weight"] < 3.5
    assert set(snapshot["detents"]) >= {"received", "dropped", "pending"}


def test_reload_failing_model_keeps_old(running, tiny_model, tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 10)
    daemon, _, _ = running(loader=lambda: make_config(tiny_model))
    engine = daemon.engine
    daemon.config_loader = lambda: make_config(str(broken))
    daemon.post(Reload())
    assert daemon.sync(30)
    assert daemon.engine is engine
    assert daemon.config.model.path == tiny_model
    assert daemon.model_path == tiny_model
    daemon.post(Step(1))
    assert daemon.sync(30)
    assert daemon.engine.n_generated == 1
