"""Fonts for the display: the built-in 5x8 bitmap font, or a font file from config.

The layout measures and draws with the same ``DisplayFont``, so a line that measures
as fitting always fits when drawn.
"""

import logging
import tempfile
from importlib import resources
from pathlib import Path

from PIL import BdfFontFile, ImageFont

from appliance.errors import ConfigError

__all__ = ["DisplayFont", "load_font", "BUILTIN_FONT"]

log = logging.getLogger(__name__)

# The built-in font: printable ASCII drawn for this project in 6x8 cells, so a text
# line is exactly one SSD1306 page tall and 21 characters fit across 128 pixels.
BUILTIN_FONT = "crank-5x8.bdf"

# The built-in font draws a hollow box at code 0x7F (DEL), which normalised text
# never contains otherwise because control characters are replaced first.
_BUILTIN_REPLACEMENT = "\x7f"

# A code point no font maps: FreeType draws glyph 0 (.notdef) for it, which is what
# it also draws for any other character the font lacks.
_UNMAPPED = "\uffff"

_COVERAGE_CACHE_SIZE = 8192

_TRUETYPE_SUFFIXES = {".ttf", ".otf", ".ttc", ".otc", ".woff", ".woff2", ".pfb", ".pfa"}


class DisplayFont:
    """A Pillow font plus what the layout needs: line height, glyph coverage, width."""

    def __init__(self, font, *, line_height: int, replacement: str, name: str):
        if line_height <= 0:
            raise ConfigError(f"font {name} has no height; use another font file")
        self.font = font
        self.line_height = line_height
        self.name = name
        self._truetype = isinstance(font, ImageFont.FreeTypeFont)
        self._notdef = self._glyph_signature(_UNMAPPED) if self._truetype else None
        self._coverage: dict[str, bool] = {}
        self.replacement = replacement

    def _glyph_signature(self, ch: str):
        mask = self.font.getmask(ch, mode="1")
        return (mask.size, bytes(mask), self.font.getlength(ch))

    def has_glyph(self, ch: str) -> bool:
        """Return True when the font draws ``ch`` with a glyph of its own."""
        known = self._coverage.get(ch)
        if known is None:
            known = self._probe(ch)
            if len(self._coverage) >= _COVERAGE_CACHE_SIZE:
                self._coverage.clear()
            self._coverage[ch] = known
        return known

    def _probe(self, ch: str) -> bool:
        if len(ch) != 1 or 0xD800 <= ord(ch) <= 0xDFFF:
            return False
        if self._truetype:
            try:
                return self._glyph_signature(ch) != self._notdef
            except (UnicodeError, ValueError, OSError):
                return False
        # Pillow bitmap fonts (BDF, PIL) hold at most 256 glyphs indexed by Latin-1
        # code, and a missing glyph has zero advance width.
        if ord(ch) > 0xFF:
            return False
        return self.font.getlength(ch) > 0

    def measure(self, text: str) -> float:
        """Return the advance width of ``text`` in pixels."""
        return self.font.getlength(text)


def _load_bdf(path) -> ImageFont.ImageFont:
    with open(path, "rb") as fp:
        bdf = BdfFontFile.BdfFontFile(fp)
    if hasattr(bdf, "to_imagefont"):
        return bdf.to_imagefont()
    # Pillow releases without FontFile.to_imagefont can only save the font as
    # .pil plus .pbm files and load those back.
    with tempfile.TemporaryDirectory() as folder:
        target = Path(folder) / "font.pil"
        bdf.save(str(target))
        font = ImageFont.load(str(target))
    return font


def _bitmap_line_height(font: ImageFont.ImageFont) -> int:
    # A Pillow bitmap font has no metrics call, so take the tallest cell among
    # characters that reach both the cap height and the descender.
    _, top, _, bottom = font.getbbox("Ag|_")
    return bottom - min(top, 0)


def _pick_replacement(font: DisplayFont) -> str:
    for candidate in ("\ufffd", "\u25a1", "?"):
        if font.has_glyph(candidate):
            return candidate
    return "?"


def load_font(path: str = "", size: int = 10) -> DisplayFont:
    """Load the display font.

    ``path`` empty loads the built-in 5x8 bitmap font. Otherwise it names a TrueType
    or OpenType file (drawn at ``size`` pixels, without anti-aliasing on the 1-bit
    panel), a BDF bitmap font, or a Pillow ``.pil`` bitmap font. Bitmap fonts have
    one size, so ``size`` applies to outline fonts only.
    """
    if not isinstance(size, int) or isinstance(size, bool) or not 4 <= size <= 128:
        raise ConfigError(f"font_size {size!r} is invalid: use a whole number of pixels from 4 to 128")

    if not path:
        with resources.as_file(resources.files("appliance") / "data" / BUILTIN_FONT) as builtin:
            font = _load_bdf(builtin)
        return DisplayFont(font, line_height=8, replacement=_BUILTIN_REPLACEMENT, name=BUILTIN_FONT)

    file = Path(path)
    suffix = file.suffix.lower()
    # A bare name such as "DejaVuSans.ttf" is looked up by Pillow in the system font
    # folders; anything else must be an existing file.
    system_font = file.name == path and suffix in _TRUETYPE_SUFFIXES
    if not file.is_file() and not system_font:
        raise ConfigError(f"font file not found: {path}; set [display] font to a .ttf, .otf, "
                          ".bdf or .pil file, or leave it empty for the built-in font")
    try:
        if suffix in _TRUETYPE_SUFFIXES:
            # BASIC layout: no bidi reordering or shaping, so measuring a line and
            # drawing it give the same widths whether or not libraqm is installed.
            font = ImageFont.truetype(path, size, layout_engine=ImageFont.Layout.BASIC)
            ascent, descent = font.getmetrics()
            loaded = DisplayFont(font, line_height=ascent + descent, replacement="?", name=file.name)
        elif suffix == ".bdf":
            font = _load_bdf(file)
            loaded = DisplayFont(font, line_height=_bitmap_line_height(font), replacement="?", name=file.name)
        elif suffix == ".pil":
            font = ImageFont.load(str(file))
            loaded = DisplayFont(font, line_height=_bitmap_line_height(font), replacement="?", name=file.name)
        else:
            raise ConfigError(f"font file {path} has an unknown type; use a .ttf, .otf, .bdf or .pil file")
    except (OSError, SyntaxError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"font {path} could not be loaded ({exc}); use another font file") from exc

    loaded.replacement = _pick_replacement(loaded)
    log.info("display font %s, line height %d px", loaded.name, loaded.line_height)
    return loaded
