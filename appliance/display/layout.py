"""The frame layout: a word-wrapped text area, a message row, and a status bar.

With the built-in 6x8 font on a 128x64 panel the frame is eight 8-row lines, each
exactly one controller page::

    pages 0-6   story text, 21 characters a line, newest line at the bottom
    page 6      the message row, drawn inverted, when the state carries a message
    page 7      status bar under a dotted rule: tokens, context use, tokens/s, ms/step

Keeping lines on page boundaries matters for the bus: a new word changes one page
of text plus the status bar, which is what the page-diff writer sends.
"""

import math
from dataclasses import replace

from PIL import Image, ImageDraw

from appliance.errors import ConfigError
from appliance.display.font import DisplayFont, load_font
from appliance.display.state import DisplayState
from appliance.display.text import normalise
from appliance.display.wrap import Wrapper

__all__ = ["Layout", "format_status"]

_ELLIPSIS = "..."


def _count(value) -> str:
    if not math.isfinite(value) or value < 0:
        return "-"
    return str(int(value))


def _rate(tokens_per_s) -> str:
    if not math.isfinite(tokens_per_s) or tokens_per_s < 0:
        return "-"
    if tokens_per_s < 10:
        return f"{tokens_per_s:.1f}"
    return f"{tokens_per_s:.0f}"


def _step(ms_per_step) -> str:
    if not math.isfinite(ms_per_step) or ms_per_step < 0:
        return "-ms"
    if ms_per_step < 1000:
        return f"{ms_per_step:.0f}ms"
    return f"{ms_per_step / 1000:.1f}s"


def _percent(used, total) -> str:
    if not (math.isfinite(used) and math.isfinite(total)) or total <= 0 or used < 0:
        return "-"
    return str(min(999, round(100 * used / total)))


def format_status(state: DisplayState) -> list[str]:
    """Return status bar texts for ``state``, from the most detailed to the shortest.

    The layout draws the first one that fits the width. In the short forms "t" counts
    generated tokens, "c" is the share of the context in use, "/s" is tokens per second
    and the last field is the duration of the last decode step.
    """
    tokens = _count(state.tokens)
    rate = _rate(state.tokens_per_s)
    step = _step(state.ms_per_step)
    if state.n_ctx > 0:
        used = _count(state.ctx_used)
        total = _count(state.n_ctx)
        percent = _percent(state.ctx_used, state.n_ctx)
        return [
            f"{tokens} tok  ctx {used}/{total}  {rate} tok/s  {step}",
            f"{tokens}t {used}/{total} {rate}/s {step}",
            f"{tokens}t c{percent}% {rate}/s {step}",
            f"{tokens}t c{percent}% {rate}/s",
            f"{tokens}t c{percent}%",
            f"{tokens}t",
        ]
    return [
        f"{tokens} tok  {rate} tok/s  {step}",
        f"{tokens}t {rate}/s {step}",
        f"{tokens}t {rate}/s",
        f"{tokens}t",
    ]


class Layout:
    """Draws a ``DisplayState`` into a 1-bit frame of ``width`` x ``height`` pixels.

    An empty ``font_path`` selects the built-in 5x8 bitmap font. Otherwise it names a
    TrueType, OpenType, BDF or PIL font, and ``font_size`` sets the pixel size of an
    outline font. A Layout keeps the wrapped lines of the last story it drew, so
    drawing a story that grew by one token re-wraps only its last line.
    """

    def __init__(self, width: int = 128, height: int = 64, font_path: str = "", font_size: int = 10):
        for name, value in (("width", width), ("height", height)):
            if isinstance(value, bool) or not isinstance(value, int) or not 8 <= value <= 1024:
                raise ConfigError(f"display {name} {value!r} is invalid: use a whole number of pixels from 8 to 1024")
        self.width = width
        self.height = height
        self.font: DisplayFont = load_font(font_path, font_size)
        self.line_height = self.font.line_height

        # The status bar is the bottom line; its first row is the dotted rule.
        self.status_top = height - self.line_height
        self.rows = self.status_top // self.line_height
        if self.rows < 1:
            raise ConfigError(f"font {self.font.name} is {self.line_height} px tall, too tall for a "
                              f"{height} px display; use a smaller font_size or font")
        # Spare rows go above the text, so the newest line sits on the status bar.
        self.text_top = self.status_top - self.rows * self.line_height
        self._wrapper = Wrapper(width, self.font.measure, self._normalise, keep=self.rows)

    def _normalise(self, text: str) -> str:
        return normalise(text, self.font.has_glyph, self.font.replacement)

    def lines(self, text: str) -> list[str]:
        """Return the wrapped lines of ``text`` that fit the text area, newest last."""
        return self._wrapper.wrap(text)[-self.rows:]

    def _fit(self, text: str, width: int) -> str:
        """Return ``text`` cut to ``width`` pixels, ending in an ellipsis when cut."""
        if self.font.measure(text) <= width:
            return text
        while text and self.font.measure(text + _ELLIPSIS) > width:
            text = text[:-1]
        return text + _ELLIPSIS

    def status(self, state: DisplayState) -> str:
        """Return the status bar text for ``state``: the most detailed form that fits.

        The form must also fit typical wide figures: a three-digit token count, 99 % of
        the context, "9.9" tok/s and "999ms". The bar then keeps one form while the
        figures change, instead of switching back and forth as a number gains a digit.
        """
        candidates = format_status(state)
        widest = format_status(
            replace(
                state,
                tokens=max(state.tokens, 999),
                ctx_used=max(state.ctx_used, state.n_ctx * 99 // 100),
                tokens_per_s=9.9,
                ms_per_step=999.0,
            )
        )
        for candidate, wide in zip(candidates, widest, strict=True):
            if self.font.measure(wide) <= self.width and self.font.measure(candidate) <= self.width:
                return candidate
        return self._fit(candidates[-1], self.width)

    def render(self, state: DisplayState) -> Image.Image:
        """Return the frame for ``state`` as a mode "1" image of the display size."""
        image = Image.new("1", (self.width, self.height), 0)
        draw = ImageDraw.Draw(image)
        font = self.font.font
        height = self.line_height

        message = " ".join(self._normalise(part) for part in state.message.split())
        text_rows = self.rows - 1 if message else self.rows
        lines = self.lines(state.text)[-text_rows:] if text_rows else []
        for row, line in enumerate(lines):
            draw.text((0, self.text_top + row * height), line, font=font, fill=255)

        if message:
            top = self.text_top + (self.rows - 1) * height
            draw.rectangle((0, top, self.width - 1, top + height - 1), fill=255)
            draw.text((1, top), self._fit(message, self.width - 2), font=font, fill=0)

        # A dotted rule lights half the pixels of a solid one, so it wears the OLED
        # less while it stays on screen for hours.
        draw.point([(x, self.status_top) for x in range(0, self.width, 2)], fill=255)
        draw.text((0, self.status_top + 1), self.status(state), font=font, fill=255)
        return image
