"""Emulated displays: PNG, GIF, terminal and dummy, through the same render thread."""

import io

import pytest
from PIL import Image, ImageSequence

from appliance.display import open_display
from appliance.display.clock import ManualClock
from appliance.display.emulators import TerminalPanel
from appliance.display.fakebus import FakeBus
from appliance.display.layout import Layout
from appliance.errors import ConfigError
from appliance.display.state import DisplayState

WAIT = 10.0
STATES = [DisplayState(text="The crank turns" + " and turns" * n, tokens=3 + 2 * n, ctx_used=10 + n,
                       n_ctx=512, tokens_per_s=1.0 + n, ms_per_step=90) for n in range(4)]


def same_pixels(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and a.convert("1").tobytes() == b.convert("1").tobytes()


def run(display, states=STATES):
    for item in states:
        display.update(item)
        assert display.flush(WAIT)


def test_png_holds_latest_frame(tmp_path):
    path = tmp_path / "frame.png"
    display = open_display(driver="png", output=str(path))
    run(display)
    display.close()
    with Image.open(path) as image:
        assert image.mode == "1"
        assert same_pixels(image, Layout().render(STATES[-1]))


def test_png_survives_close_without_persist(tmp_path):
    path = tmp_path / "frame.png"
    display = open_display(driver="png", output=str(path), persist=False)
    run(display)
    display.close()
    with Image.open(path) as image:
        assert image.getbbox() is not None


def test_png_numbered_snapshots(tmp_path):
    display = open_display(driver="png", output=str(tmp_path / "{n:03d}.png"))
    run(display)
    display.close()
    names = sorted(path.name for path in tmp_path.iterdir())
    assert names == ["000.png", "001.png", "002.png", "003.png"]


def test_png_needs_output():
    with pytest.raises(ConfigError, match="output"):
        open_display(driver="png")


def test_png_missing_directory(tmp_path):
    with pytest.raises(ConfigError, match="directory not found"):
        open_display(driver="png", output=str(tmp_path / "nope" / "frame.png"))


def test_gif_has_every_frame(tmp_path):
    path = tmp_path / "story.gif"
    clock = ManualClock()
    display = open_display(driver="gif", output=str(path), clock=clock)
    for item in STATES:
        display.update(item)
        display.flush(WAIT)
        clock.advance(0.5)
    display.close()
    with Image.open(path) as gif:
        frames = [frame.convert("1") for frame in ImageSequence.Iterator(gif)]
    assert len(frames) == len(STATES)
    assert all(same_pixels(frame, Layout().render(item)) for frame, item in zip(frames, STATES))


def test_gif_delay_follows_clock(tmp_path):
    path = tmp_path / "story.gif"
    clock = ManualClock()
    display = open_display(driver="gif", output=str(path), clock=clock)
    display.update(STATES[0])
    display.flush(WAIT)
    clock.advance(0.5)
    display.update(STATES[1])
    display.flush(WAIT)
    display.close()
    with Image.open(path) as gif:
        assert gif.info["duration"] == 500


def test_gif_written_on_flush(tmp_path):
    path = tmp_path / "story.gif"
    display = open_display(driver="gif", output=str(path))
    run(display, STATES[:1])
    assert path.is_file()
    display.close()


def test_dummy_keeps_last_image():
    display = open_display(driver="dummy")
    run(display)
    assert same_pixels(display.panel.image, Layout().render(STATES[-1]))
    display.close()


def test_dummy_close_blanks():
    display = open_display(driver="dummy")
    run(display)
    display.close()
    assert display.panel.image.getbbox() is None
    assert not display.panel.is_on


def test_dummy_rotates_like_luma():
    display = open_display(driver="dummy", width=64, height=128, rotate=1)
    run(display)
    assert display.panel.image.size == (64, 128)
    display.close()


def terminal_output(**settings):
    stream = io.StringIO()
    display = open_display(driver="terminal", stream=stream, **settings)
    run(display)
    display.close()
    return stream.getvalue()


def test_terminal_draws_half_blocks():
    output = terminal_output(persist=True)
    assert set(output) & {"\u2580", "\u2584", "\u2588"}


def test_terminal_redraws_in_place():
    output = terminal_output(persist=True)
    # 32 frame lines plus the status line: later frames move the cursor up 33 lines.
    assert output.count("\x1b[33A") == len(STATES) - 1


def test_terminal_prints_status_line():
    output = terminal_output(persist=True)
    assert "tok/s" in output


def test_terminal_frame_lines_are_display_wide():
    output = terminal_output(persist=True)
    first_frame = output.split("\x1b[33A")[0]
    lines = [line for line in first_frame.split("\n") if "\u2580" in line or "\u2584" in line]
    assert all(line.count("\x1b[2K") == 1 for line in lines)
    assert all(len(line.replace("\x1b[2K", "").replace("\x1b[0m", "").replace("\x1b[?25l", "")) == 128
               for line in lines)


def test_terminal_close_shows_off():
    output = terminal_output(persist=False)
    assert output.rstrip().endswith("(display off)\n\x1b[?25h".rstrip())


def test_terminal_caption_strips_control_characters():
    caption = TerminalPanel.caption(DisplayState(message="bad\x1b[2Jthing"))
    assert "\x1b" not in caption


def test_terminal_dims_when_idle():
    stream = io.StringIO()
    clock = ManualClock()
    display = open_display(driver="terminal", stream=stream, clock=clock, dim_after=60, off_after=0)
    run(display, STATES[:1])
    clock.advance(60)
    display.wait_idle(WAIT)
    display.close()
    assert "\x1b[2m" in stream.getvalue()


def test_emulator_rejects_bus():
    with pytest.raises(ConfigError, match="bus"):
        open_display(driver="dummy", bus=FakeBus())


def test_emulator_rejects_tiny_size():
    with pytest.raises(ConfigError, match="size"):
        open_display(driver="dummy", width=4, height=64)


def test_terminal_narrow_uses_quadrants():
    import fcntl
    import os
    import struct
    import termios

    master, slave = os.openpty()
    # An 80-column terminal cannot show 128 half-block columns without wrapping.
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 80, 0, 0))  # rows, columns
    stream = os.fdopen(slave, "w", encoding="utf-8")
    panel = TerminalPanel(128, 64, stream=stream)
    image = Image.new("1", (128, 64), 0)
    image.putpixel((0, 0), 1)
    image.putpixel((127, 63), 1)
    panel._image = image
    try:
        lines = panel._render_lines()
    finally:
        stream.close()
        os.close(master)
    assert len(lines) == 32
    assert all(len(line) == 64 for line in lines)
    assert lines[0][0] == "\u2598"
    assert lines[-1][-1] == "\u2597"


def test_terminal_short_uses_braille():
    import fcntl
    import os
    import struct
    import termios

    master, slave = os.openpty()
    # 24 rows cannot hold 32 half-block rows plus the status line.
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    stream = os.fdopen(slave, "w", encoding="utf-8")
    panel = TerminalPanel(128, 64, stream=stream)
    image = Image.new("1", (128, 64), 0)
    image.putpixel((0, 0), 1)
    image.putpixel((1, 3), 1)
    image.putpixel((127, 63), 1)
    panel._image = image
    try:
        lines = panel._render_lines()
    finally:
        stream.close()
        os.close(master)
    assert len(lines) == 16
    assert all(len(line) == 64 for line in lines)
    assert lines[0][0] == chr(0x2800 | 0x01 | 0x80)
    assert lines[-1][-1] == chr(0x2800 | 0x80)
    assert lines[5][10] == chr(0x2800)
