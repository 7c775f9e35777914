"""Layout: golden frames for wrap, scroll, status bar, long words and messages.

Golden images live in tests/golden/. After an intended change to the font or the
layout, regenerate them and look at every changed PNG before committing:

    CRANKLLM_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_display_layout.py
"""

import os
from pathlib import Path

import pytest
from PIL import Image

from appliance.display.layout import Layout, format_status
from appliance.display.state import DisplayState
from appliance.errors import ConfigError

from test_display_text import TORTURE

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("CRANKLLM_UPDATE_GOLDEN") == "1"
DEJAVU_MONO = Path("/usr/share/fonts/truetype/dejavu/DejaVuSansMono.ttf")

STORY = ("Once upon a time a clockmaker built a box with a crank. Each turn of the crank "
         "made the box think one more word, and the words appeared on a tiny screen.")


def check_golden(image: Image.Image, name: str, tmp_path: Path) -> None:
    path = GOLDEN / f"{name}.png"
    if UPDATE:
        GOLDEN.mkdir(exist_ok=True)
        image.save(path)
    with Image.open(path) as expected:
        expected = expected.convert("1")
    # Compare packed bits: mode "1" images may hold 1 or 255 for a lit pixel.
    same = image.size == expected.size and image.tobytes() == expected.tobytes()
    if not same:
        image.save(tmp_path / f"{name}.actual.png")
    assert same, f"{name} differs from its golden image; actual frame saved in {tmp_path}"


@pytest.fixture(scope="module")
def layout():
    return Layout()


def test_golden_wrap(layout, tmp_path):
    state = DisplayState(text="The crank turns and a word appears.", tokens=7, ctx_used=19, n_ctx=512,
                         tokens_per_s=1.5, ms_per_step=84)
    check_golden(layout.render(state), "wrap", tmp_path)


def test_golden_scroll(layout, tmp_path):
    state = DisplayState(text=STORY, tokens=40, ctx_used=52, n_ctx=512, tokens_per_s=2.25, ms_per_step=310)
    check_golden(layout.render(state), "scroll", tmp_path)


def test_golden_status_bar(layout, tmp_path):
    state = DisplayState(text="", tokens=1234, ctx_used=1500, n_ctx=2048, tokens_per_s=12.4, ms_per_step=1520)
    check_golden(layout.render(state), "status", tmp_path)


def test_golden_long_words(layout, tmp_path):
    state = DisplayState(text="see https://example.invalid/a/very/long/path/that/never/ends?q=1 and "
                              "Pneumonoultramicroscopicsilicovolcanoconiosis!", tokens=9)
    check_golden(layout.render(state), "long_words", tmp_path)


def test_golden_message(layout, tmp_path):
    state = DisplayState(text="The story so far, with a model error at the end of it.", tokens=12,
                         message="model error: decode failed, returned -3 from llama_decode")
    check_golden(layout.render(state), "message", tmp_path)


def test_golden_unicode(layout, tmp_path):
    state = DisplayState(text="\u201cQuoted\u201d \u2014 caf\u00e9\u2026 \u05e9\u05dc\u05d5\u05dd "
                              "\U0001F468\u200d\U0001F469\u200d\U0001F467 end", tokens=5)
    check_golden(layout.render(state), "unicode", tmp_path)


def test_frame_is_mode_1_display_size(layout):
    image = layout.render(DisplayState(text="x"))
    assert image.mode == "1"
    assert image.size == (128, 64)


def test_text_rows_are_page_aligned(layout):
    assert layout.line_height == 8
    assert layout.rows == 7
    assert layout.text_top == 0


def test_newest_line_is_visible(layout):
    text = " ".join(f"w{i}" for i in range(500))
    assert layout.lines(text)[-1].endswith("w499")


def test_message_takes_bottom_text_row(layout):
    frame = layout.render(DisplayState(message="loading model"))
    # The inverted bar covers page 6; its right end is past the text, so fully lit.
    assert all(frame.getpixel((127, y)) for y in range(48, 56))


def test_no_message_leaves_row_dark(layout):
    frame = layout.render(DisplayState())
    assert frame.crop((0, 0, 128, 56)).getbbox() is None


def test_status_prefers_detailed_form(layout):
    # A 100-token context fits the used/total form, but not with three-digit token
    # counts, so the percent form is chosen from the start.
    state = DisplayState(tokens=5, ctx_used=10, n_ctx=100, tokens_per_s=1.0, ms_per_step=50)
    assert layout.status(state) == "5t c10% 1.0/s 50ms"


def test_status_form_stays_as_figures_grow(layout):
    small = DisplayState(tokens=9, ctx_used=20, n_ctx=512, tokens_per_s=9.5, ms_per_step=9)
    large = DisplayState(tokens=400, ctx_used=450, n_ctx=512, tokens_per_s=12.0, ms_per_step=120)
    assert layout.status(small) == "9t c4% 9.5/s 9ms"
    assert layout.status(large) == "400t c88% 12/s 120ms"


def test_status_falls_back_to_percent(layout):
    state = DisplayState(tokens=1234, ctx_used=1500, n_ctx=2048, tokens_per_s=12.4, ms_per_step=1520)
    assert layout.status(state) == "1234t c73% 12/s"


def test_status_without_context(layout):
    assert layout.status(DisplayState(tokens=3, tokens_per_s=0.5, ms_per_step=9)) == "3t 0.5/s 9ms"


def test_status_survives_odd_numbers(layout):
    state = DisplayState(tokens=-1, ctx_used=float("nan"), n_ctx=10**30, tokens_per_s=float("inf"),
                         ms_per_step=-5.0)
    assert layout.font.measure(layout.status(state)) <= 128


def test_status_last_form_is_token_count():
    forms = format_status(DisplayState(tokens=1, ctx_used=2, n_ctx=3))
    assert forms[-1] == "1t"


@pytest.mark.parametrize("text", TORTURE, ids=range(len(TORTURE)))
def test_torture_renders(layout, text):
    image = layout.render(DisplayState(text=text, message=text[:40]))
    assert image.size == (128, 64)


def test_state_rejects_non_string_text():
    with pytest.raises(TypeError):
        DisplayState(text=None)


def test_height_too_small_for_font():
    with pytest.raises(ConfigError, match="too tall"):
        Layout(width=128, height=8)


def test_missing_font_file():
    with pytest.raises(ConfigError, match="font file not found"):
        Layout(font_path="/nonexistent/font.ttf")


def test_unknown_font_type(tmp_path):
    path = tmp_path / "font.xyz"
    path.write_bytes(b"junk")
    with pytest.raises(ConfigError, match="unknown type"):
        Layout(font_path=str(path))


def test_broken_font_file(tmp_path):
    path = tmp_path / "font.ttf"
    path.write_bytes(b"not a font")
    with pytest.raises(ConfigError, match="could not be loaded"):
        Layout(font_path=str(path))


@pytest.mark.skipif(not DEJAVU_MONO.is_file(), reason="DejaVu Sans Mono is not installed")
def test_truetype_font_lines_fit_width():
    layout = Layout(font_path=str(DEJAVU_MONO), font_size=10)
    lines = layout.lines(STORY)
    assert all(layout.font.measure(line) <= 128 for line in lines)


@pytest.mark.skipif(not DEJAVU_MONO.is_file(), reason="DejaVu Sans Mono is not installed")
def test_truetype_font_draws_typographic_quotes():
    layout = Layout(font_path=str(DEJAVU_MONO), font_size=10)
    assert layout.lines("\u201cok\u201d") == ["\u201cok\u201d"]


@pytest.mark.skipif(not DEJAVU_MONO.is_file(), reason="DejaVu Sans Mono is not installed")
def test_truetype_font_replaces_missing_glyph():
    layout = Layout(font_path=str(DEJAVU_MONO), font_size=10)
    assert layout.lines("\U0001F600") == [layout.font.replacement]


@pytest.mark.skipif(not DEJAVU_MONO.is_file(), reason="DejaVu Sans Mono is not installed")
def test_truetype_font_by_system_name():
    layout = Layout(font_path=DEJAVU_MONO.name, font_size=10)
    assert layout.font.name == DEJAVU_MONO.name


def test_unknown_system_font_name():
    with pytest.raises(ConfigError, match="could not be loaded"):
        Layout(font_path="NoSuchFontAnywhere.ttf")


def test_bdf_font_from_path():
    builtin = Path(__file__).parents[1] / "appliance" / "data" / "crank-5x8.bdf"
    layout = Layout(font_path=str(builtin))
    assert layout.line_height == 8
