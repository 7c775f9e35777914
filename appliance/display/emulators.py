"""Emulated displays: terminal, PNG snapshots, animated GIF, and an in-memory dummy.

They take the same frames from the same layout and render thread as the OLED panel,
so the simulator shows exactly what the box would. Like luma's pseudo-devices they
store frames in panel orientation: with ``rotate`` 0 that is the layout's frame
itself, pixel for pixel, at scale 1.
"""

import os
import sys
from pathlib import Path

from PIL import Image

from appliance.errors import ConfigError
from appliance.display.layout import format_status
from appliance.display.panel import Panel
from appliance.display.state import DisplayState

__all__ = ["DummyPanel", "PngPanel", "GifPanel", "TerminalPanel", "EMULATORS", "open_emulator"]

# Half-block characters indexed by (top pixel) | (bottom pixel << 1).
# Braille dot bits by (x, y) in the 2x4 cell (Unicode braille patterns, U+2800..U+28FF).
_BRAILLE_DOTS = (
    ((0, 0), 0x01), ((0, 1), 0x02), ((0, 2), 0x04), ((1, 0), 0x08),
    ((1, 1), 0x10), ((1, 2), 0x20), ((0, 3), 0x40), ((1, 3), 0x80),
)
# Indexed by upper-left 1, upper-right 2, lower-left 4, lower-right 8 (U+2596..U+259F).
_QUADRANTS = " ▘▝▀▖▌▞▛▗▚▐▜▄▙▟█"
_HALF_BLOCKS = (" ", "\u2580", "\u2584", "\u2588")

_CURSOR_HIDE = "\x1b[?25l"
_CURSOR_SHOW = "\x1b[?25h"
_CLEAR_LINE = "\x1b[2K"
_FAINT = "\x1b[2m"
_RESET = "\x1b[0m"

# GIF frame delays are stored in 1/100 s, and browsers stretch delays below 20 ms.
_GIF_MIN_DELAY_MS = 20
_GIF_LAST_DELAY_MS = 2000


def _oriented(image: Image.Image, rotate: int) -> Image.Image:
    """Return ``image`` as the panel holds it after ``rotate`` quarter turns clockwise."""
    if rotate == 0:
        return image.copy()
    return image.rotate(rotate * -90, expand=True)


def _logical_size(width: int, height: int, rotate: int) -> tuple[int, int]:
    return (width, height) if rotate % 2 == 0 else (height, width)


class DummyPanel(Panel):
    """Keeps the last frame in memory (``image``), with power and contrast state."""

    def __init__(self, width: int, height: int, rotate: int = 0):
        self.size = _logical_size(width, height, rotate)
        self.rotate = rotate
        self.image = Image.new("1", (width, height))
        self.is_on = True
        self.contrast = 255
        self.frames = 0

    def draw(self, image: Image.Image, state: DisplayState) -> None:
        self.image = _oriented(image, self.rotate)
        self.frames += 1

    def set_contrast(self, level: int) -> None:
        self.contrast = level

    def set_power(self, on: bool) -> None:
        self.is_on = on

    def shutdown(self, persist: bool) -> None:
        if not persist:
            self.image = Image.new("1", self.image.size)
            self.is_on = False


class PngPanel(Panel):
    """Writes each frame as a PNG, mode "1", at scale 1.

    ``output`` is a file path that every frame overwrites (the file always contains the
    latest frame), or a pattern with ``{n}`` such as ``frames/{n:05d}.png`` for
    numbered snapshots. Files are replaced atomically, so a reader never sees half a
    PNG.
    """

    def __init__(self, output: str, width: int, height: int, rotate: int = 0):
        if not output:
            raise ConfigError("display driver png needs an output path, such as /tmp/crankllm.png")
        numbered = "{n" in output
        try:
            sample = output.format(n=0) if numbered else output
        except (KeyError, IndexError, ValueError) as exc:
            raise ConfigError(f"png output pattern {output!r} is invalid ({exc}); use {{n}} for the frame number") from exc
        if not Path(sample).parent.is_dir():
            raise ConfigError(f"png output directory not found: {Path(sample).parent}")
        self.output = output
        self.numbered = numbered
        self.size = _logical_size(width, height, rotate)
        self.rotate = rotate
        self.frames = 0
        self.last_path: str | None = None

    def draw(self, image: Image.Image, state: DisplayState) -> None:
        path = self.output.format(n=self.frames) if self.numbered else self.output
        temporary = f"{path}.partial"
        _oriented(image, self.rotate).save(temporary, format="PNG")
        os.replace(temporary, path)
        self.frames += 1
        self.last_path = path


class GifPanel(Panel):
    """Records every frame sent and writes them as an animated GIF.

    The file is written when the display flushes or closes; each frame's delay is
    the time until the next frame, from the display's clock.
    """

    def __init__(self, output: str, width: int, height: int, rotate: int = 0, *, clock=None):
        if not output:
            raise ConfigError("display driver gif needs an output path, such as /tmp/crankllm.gif")
        if not Path(output).parent.is_dir():
            raise ConfigError(f"gif output directory not found: {Path(output).parent}")
        self.output = output
        self.size = _logical_size(width, height, rotate)
        self.rotate = rotate
        self._clock = clock
        self.frames: list[Image.Image] = []
        self._times: list[float] = []
        self._written = 0

    def attach_clock(self, clock) -> None:
        self._clock = clock

    def draw(self, image: Image.Image, state: DisplayState) -> None:
        # Kept as 1-bit images, 1 KB each for 128x64, converted only when saving.
        self.frames.append(_oriented(image, self.rotate))
        self._times.append(self._clock.now() if self._clock is not None else 0.0)

    def sync(self) -> None:
        if not self.frames or self._written == len(self.frames):
            return
        delays = []
        for index in range(len(self.frames)):
            if index + 1 < len(self._times):
                delay = round((self._times[index + 1] - self._times[index]) * 1000)
            else:
                delay = _GIF_LAST_DELAY_MS
            delays.append(max(_GIF_MIN_DELAY_MS, delay))
        # NOTE: every sync rewrites the whole file, so flushing after each of many
        # thousands of frames gets slow; the simulator flushes once at the end.
        frames = [frame.convert("L") for frame in self.frames]
        temporary = f"{self.output}.partial"
        frames[0].save(temporary, format="GIF", save_all=True, append_images=frames[1:],
                       duration=delays, loop=0, optimize=False)
        os.replace(temporary, self.output)
        self._written = len(self.frames)

    def shutdown(self, persist: bool) -> None:
        self.sync()


class TerminalPanel(Panel):
    """Draws the frame in a terminal with half blocks, two pixel rows per line.

    The first frame is printed where the cursor is; later frames move the cursor up
    and overwrite it. The line under the frame is the full status text. A terminal
    too small for the frame would wrap or scroll it and break the redraw. So a
    terminal narrower than ``width`` columns gets 2x2 pixels per character (quadrant
    blocks). One with fewer rows than the frame and its status line gets 2x4 pixels
    per character (braille), which fits 128x64 into 64x16 cells.
    """

    def __init__(self, width: int, height: int, rotate: int = 0, *, stream=None, path: str = ""):
        self.size = _logical_size(width, height, rotate)
        self.rotate = rotate
        self._path = path
        self._owned = None
        self._stream = stream if stream is not None else sys.stdout
        self._lines_drawn = 0
        self._image: Image.Image | None = None
        self._caption = ""
        self._on = True
        self._faint = False
        self.frames = 0

    def open(self) -> None:
        # A path such as /dev/tty1 puts the emulated panel on another console.
        if self._path and self._owned is None:
            self._owned = open(self._path, "w", encoding="utf-8")
            self._stream = self._owned

    @staticmethod
    def caption(state: DisplayState) -> str:
        """Return the status line printed under the frame, safe for a terminal."""
        text = format_status(state)[0]
        if state.message:
            text += "  | " + state.message
        # Control characters in a model's message must not reach the terminal.
        return "".join(ch if ch.isprintable() else "?" for ch in text)

    def _terminal_size(self) -> os.terminal_size | None:
        try:
            return os.get_terminal_size(self._stream.fileno())
        except (AttributeError, OSError, ValueError):
            return None

    def _render_lines(self) -> list[str]:
        image = self._image
        if image is None:
            return []
        width, height = image.size
        pixels = image.load()
        size = self._terminal_size()
        if size is not None:
            # One more row than the frame for the status line, one for the cursor.
            if size.lines < (height + 1) // 2 + 2:
                return self._render_braille(pixels, width, height)
            if size.columns < width:
                return self._render_quadrants(pixels, width, height)
        lines = []
        for top in range(0, height, 2):
            cells = []
            for x in range(width):
                upper = 1 if self._on and pixels[x, top] else 0
                lower = 1 if self._on and top + 1 < height and pixels[x, top + 1] else 0
                cells.append(_HALF_BLOCKS[upper | lower << 1])
            lines.append("".join(cells))
        return lines

    def _render_quadrants(self, pixels, width: int, height: int) -> list[str]:
        def lit(x: int, y: int) -> int:
            return 1 if self._on and x < width and y < height and pixels[x, y] else 0

        lines = []
        for top in range(0, height, 2):
            cells = []
            for left in range(0, width, 2):
                bits = (lit(left, top) | lit(left + 1, top) << 1
                        | lit(left, top + 1) << 2 | lit(left + 1, top + 1) << 3)
                cells.append(_QUADRANTS[bits])
            lines.append("".join(cells))
        return lines

    def _render_braille(self, pixels, width: int, height: int) -> list[str]:
        def lit(x: int, y: int) -> bool:
            return self._on and x < width and y < height and bool(pixels[x, y])

        lines = []
        for top in range(0, height, 4):
            cells = []
            for left in range(0, width, 2):
                bits = 0
                for (dx, dy), bit in _BRAILLE_DOTS:
                    if lit(left + dx, top + dy):
                        bits |= bit
                cells.append(chr(0x2800 + bits))
            lines.append("".join(cells))
        return lines

    def _refresh(self) -> None:
        lines = self._render_lines()
        caption = self._caption if self._on else "(display off)"
        out = []
        if self._lines_drawn:
            out.append(f"\x1b[{self._lines_drawn}A\r")
        else:
            out.append(_CURSOR_HIDE)
        style = _FAINT if self._faint else ""
        for line in lines:
            out.append(f"{_CLEAR_LINE}{style}{line}{_RESET}\n")
        out.append(f"{_CLEAR_LINE}{caption}\n")
        self._stream.write("".join(out))
        self._stream.flush()
        self._lines_drawn = len(lines) + 1

    def draw(self, image: Image.Image, state: DisplayState) -> None:
        self._image = _oriented(image, self.rotate)
        self._caption = self.caption(state)
        self.frames += 1
        self._refresh()

    def set_contrast(self, level: int) -> None:
        # The terminal has two brightness levels: faint below half contrast.
        faint = level < 128
        if faint != self._faint:
            self._faint = faint
            if self._image is not None:
                self._refresh()

    def set_power(self, on: bool) -> None:
        if on != self._on:
            self._on = on
            if self._image is not None:
                self._refresh()

    def shutdown(self, persist: bool) -> None:
        if not persist:
            self._on = False
            if self._image is not None:
                self._refresh()
        if self._lines_drawn:
            self._stream.write(_CURSOR_SHOW)
            self._stream.flush()
        self.release()

    def release(self) -> None:
        if self._owned is not None:
            self._owned.close()
            self._owned = None


EMULATORS = ("terminal", "png", "gif", "dummy")


def open_emulator(driver: str, *, width: int, height: int, rotate: int, output: str, stream=None) -> Panel:
    """Return the emulated panel named ``driver``."""
    if not 8 <= width <= 1024 or not 8 <= height <= 1024:
        raise ConfigError(f"display size {width}x{height} is invalid: use 8 to 1024 pixels a side")
    if driver == "dummy":
        return DummyPanel(width, height, rotate)
    if driver == "png":
        return PngPanel(output, width, height, rotate)
    if driver == "gif":
        return GifPanel(output, width, height, rotate)
    if driver == "terminal":
        return TerminalPanel(width, height, rotate, stream=stream, path=output)
    raise ConfigError(f"display emulator {driver!r} is unknown; use one of {', '.join(EMULATORS)}")
