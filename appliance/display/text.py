"""Text normalisation: turn any string into characters the display font can draw.

A language model emits arbitrary Unicode, and the daemon decodes it with
``errors="replace"`` or worse, so a story can contain typographic punctuation, emoji,
right-to-left letters, combining marks, control characters and even lone surrogates.
``normalise`` maps every one of them to something drawable and never raises:

* typographic quotes, dashes, ellipses and similar marks become ASCII when the font
  lacks them;
* letters the font lacks fall back to their compatibility decomposition without
  accents ("é" to "e", "ﬁ" to "fi", fullwidth "Ａ" to "A") when the font has those;
* combining marks the font lacks are dropped, so the base letter still shows;
* invisible format characters (zero-width joiners, bidi controls, variation
  selectors, soft hyphens) are dropped;
* anything else becomes the font's replacement glyph, once per cluster, so an emoji
  ZWJ sequence or a flag shows as one box rather than four.

Right-to-left text is drawn in logical order, left to right: the display has no bidi
reordering.
"""

import unicodedata
from typing import Callable

__all__ = ["normalise", "ASCII_FALLBACKS"]

# ASCII spellings for marks a small bitmap font usually lacks. Used only when the
# font cannot draw the original character.
ASCII_FALLBACKS = {
    "\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'",
    "\u2032": "'", "\u2035": "'", "\u00b4": "'",
    "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u201f": '"',
    "\u2033": '"', "\u2036": '"', "\u00ab": "<<", "\u00bb": ">>",
    "\u2039": "<", "\u203a": ">",
    "\u2010": "-", "\u2011": "-", "\u2012": "-", "\u2013": "-",
    "\u2014": "--", "\u2015": "--", "\u2212": "-", "\u2043": "-",
    "\u2026": "...", "\u22ef": "...",
    "\u00a0": " ", "\u202f": " ", "\u2007": " ",
    "\u2022": "*", "\u2023": ">", "\u2219": ".", "\u00b7": ".", "\u2027": "-",
    "\u00d7": "x", "\u00f7": "/", "\u2044": "/", "\u2215": "/",
    "\u00a9": "(c)", "\u00ae": "(R)", "\u2122": "TM", "\u00b0": "o",
    "\u2190": "<-", "\u2192": "->", "\u2194": "<->", "\u21d2": "=>",
    "\u2264": "<=", "\u2265": ">=", "\u2260": "!=", "\u2248": "~",
    "\u00ac": "!", "\u00a6": "|", "\u00bf": "?", "\u00a1": "!",
}

# Unicode general categories that never draw anything on their own.
_INVISIBLE = {"Cf"}
_MARKS = {"Mn", "Me", "Mc"}

# Emoji skin-tone modifiers (U+1F3FB..U+1F3FF) and tag characters (flag sub-regions)
# continue the cluster of the character before them.
_EMOJI_MODIFIERS = range(0x1F3FB, 0x1F400)
_TAGS = range(0xE0020, 0xE0080)
_ZWJ = "\u200d"
_REGIONAL_INDICATORS = range(0x1F1E6, 0x1F200)


def _continues_cluster(ch: str) -> bool:
    """Return True for a character that belongs to the cluster before it."""
    code = ord(ch)
    if code in _EMOJI_MODIFIERS or code in _TAGS:
        return True
    category = unicodedata.category(ch)
    if category in _MARKS:
        return True
    # A low surrogate after a high one is the second half of a pair decoded with
    # surrogatepass, which the reader sees as one character.
    return 0xDC00 <= code <= 0xDFFF


def _fallback(ch: str, has_glyph: Callable[[str], bool]) -> str | None:
    """Return an ASCII or accent-free spelling of ``ch`` that the font can draw."""
    ascii_form = ASCII_FALLBACKS.get(ch)
    if ascii_form is not None and all(has_glyph(c) for c in ascii_form):
        return ascii_form

    decomposed = unicodedata.normalize("NFKD", ch)
    stripped = "".join(c for c in decomposed if not unicodedata.combining(c))
    if stripped and stripped != ch and all(has_glyph(c) and c.isprintable() for c in stripped):
        return stripped
    return None


def normalise(text: str, has_glyph: Callable[[str], bool], replacement: str) -> str:
    """Return ``text`` with every character the font cannot draw mapped or replaced.

    ``has_glyph(ch)`` returns whether the font draws ``ch``, and ``replacement`` is a
    character it draws for anything unknown. Line breaks are not handled here: the
    word wrapper splits them out first, so ``text`` is expected to be one word or
    one run of characters without ``"\\n"``. Tabs and other control characters
    that reach this function become the replacement glyph.
    """
    # NFC first, so "e" + COMBINING ACUTE becomes the precomposed "é" that a
    # Latin-1 font has. Lone surrogates pass through unicodedata unchanged.
    text = unicodedata.normalize("NFC", text)

    out: list[str] = []
    skipping_cluster = False
    join_next = False
    i = 0
    while i < len(text):
        ch = text[i]
        i += 1
        category = unicodedata.category(ch)

        if join_next:
            # The character after a ZWJ inside a replaced cluster is part of it.
            join_next = False
            skipping_cluster = True
            continue
        if skipping_cluster:
            if ch == _ZWJ:
                join_next = True
                continue
            if ch == "\ufe0f" or ch == "\ufe0e" or _continues_cluster(ch):
                continue
            skipping_cluster = False

        if category in _INVISIBLE:
            continue
        if category == "Cc" or category == "Cs":
            out.append(replacement)
            skipping_cluster = True
            continue
        if has_glyph(ch) and ch.isprintable():
            out.append(ch)
            continue

        substitute = _fallback(ch, has_glyph)
        if substitute is not None:
            out.append(substitute)
            continue
        if category in _MARKS:
            # A combining mark the font lacks: keep the base letter, drop the mark.
            continue
        if category == "Zs":
            out.append(" ")
            continue

        out.append(replacement)
        skipping_cluster = True
        # A flag is a pair of regional indicators: swallow the second one.
        if ord(ch) in _REGIONAL_INDICATORS and i < len(text) and ord(text[i]) in _REGIONAL_INDICATORS:
            i += 1
    return "".join(out)
