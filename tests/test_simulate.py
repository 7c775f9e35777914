"""End to end: `crankllm simulate` with a scripted crank on the real default model."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageChops

from appliance.config import load_config
from appliance.display.layout import Layout
from appliance.display.state import DisplayState
from appliance.engine.engine import Engine
from appliance.service.daemon import engine_settings
from appliance.service.transcript import read_transcript
from appliance.simulate import parse_display, parse_script
from appliance.errors import ConfigError

SCRIPT = "30cw,5ccw,20cw,press,25cw"
SEED = 42


@pytest.fixture(scope="module")
def simulation(tmp_path_factory, default_model):
    directory = tmp_path_factory.mktemp("simulate")
    config = directory / "crankllm.toml"
    config.write_text(f'[model]\npath = "{default_model}"\n', encoding="utf-8")
    png = directory / "last.png"
    transcripts = directory / "transcripts"
    result = subprocess.run(
        [
            sys.executable, "-m", "appliance", "simulate",
            "--config", str(config), "--script", SCRIPT, "--rpm", "0",
            "--display", f"png:{png}", "--transcript", str(transcripts),
            "--seed", str(SEED), "--print-story",
        ],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "CRANKLLM_CONFIG": ""},
    )
    return {"result": result, "config": config, "png": png, "transcripts": transcripts}


def summary_counts(stdout: str) -> dict[str, int]:
    line = next(l for l in stdout.splitlines() if l.startswith("detents:"))
    return {name: int(value) for value, name in re.findall(r"(\d+) (\w+)", line)}


def test_exits_zero(simulation):
    result = simulation["result"]
    assert result.returncode == 0, result.stderr[-2000:]


def test_summary_matches_script(simulation):
    counts = summary_counts(simulation["result"].stdout)
    assert counts["received"] == 30 + 5 + 20 + 25
    assert counts["stepped"] == 30 + 20 + 25
    assert counts["rewound"] == 5
    assert counts["dropped"] == 0
    total = counts["stepped"] + counts["rewound"] + counts["cancelled"] + counts["dropped"] + counts["ignored"]
    assert total == counts["received"]


def test_summary_reports_bits_per_weight(simulation):
    assert re.search(r"bits per weight:\s+5\.\d\d \(Q2_K\)", simulation["result"].stdout)


def stories(simulation):
    files = sorted(Path(simulation["transcripts"]).glob("*.txt"))
    return [read_transcript(str(f)) for f in files]


def test_two_transcripts_complete(simulation):
    records = stories(simulation)
    assert len(records) == 2
    assert all(r.complete for r in records)


def test_first_story_equals_engine_output(simulation):
    # The same seed and crank sequence run directly on the engine must give the
    # exact text the daemon wrote to the transcript, rewind included.
    config = load_config(str(simulation["config"]), overrides={"model": {"seed": SEED}})
    with Engine(config.model.path, engine_settings(config.model)) as engine:
        engine.prime(config.all_prompts[0])
        for _ in range(30):
            engine.step()
        engine.rewind(5)
        for _ in range(20):
            engine.step()
        expected = engine.text
    assert stories(simulation)[0].text == expected


def test_last_story_equals_printed_story(simulation):
    printed = simulation["result"].stdout.split("\nstory:\n", 1)[1]
    assert printed == stories(simulation)[1].text + "\n"


def test_png_shows_story_tail(simulation):
    story = stories(simulation)[1].text
    image = Image.open(simulation["png"]).convert("1")
    layout = Layout(128, 64)
    expected = layout.render(DisplayState(text=story, tokens=25))
    box = (0, 0, 128, layout.status_top)
    difference = ImageChops.difference(image.crop(box).convert("L"), expected.crop(box).convert("L"))
    assert difference.getbbox() is None
    assert image.crop(box).getbbox() is not None


def test_script_parser_rejects_bad_item():
    with pytest.raises(ConfigError, match="'7up'"):
        parse_script("10cw,7up")


def test_script_parser_items():
    actions = parse_script("3cw, 2ccw,press,longpress,wait:0.5")
    assert [a.kind for a in actions] == ["cw", "ccw", "press", "long", "wait"]
    assert actions[0].count == 3
    assert actions[4].seconds == 0.5


def test_display_option_needs_path():
    with pytest.raises(ConfigError, match="needs a file"):
        parse_display("gif")
