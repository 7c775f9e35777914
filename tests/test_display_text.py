"""Text normalisation and font coverage for the display."""

import pytest

from appliance.display.font import load_font
from appliance.display.text import normalise


@pytest.fixture(scope="module")
def font():
    return load_font()


@pytest.fixture
def norm(font):
    return lambda text: normalise(text, font.has_glyph, font.replacement)


# Strings a model, a broken decoder or a hostile prompt can produce.
TORTURE = [
    "",
    "\x00",
    "a\x00b\x07c\x1b[31mred\x1b[0m",
    "\ud800",
    "\udfff lone low",
    "\ud83d\ude00 surrogate pair as two code points",
    "e\u0301\u0302\u0303\u0304\u0305",
    "Z\u0351\u0352\u0353\u0354\u0355\u0356\u0357a\u0358\u0359\u035a\u035b\u035c\u035d\u035e\u035f\u0360l\u0361go",
    "\u0301 leading combining mark",
    "\u05e9\u05dc\u05d5\u05dd \u0645\u0631\u062d\u0628\u0627 mixed RTL",
    "\u202eevil override\u202c \u2066isolate\u2069",
    "\U0001F468\u200d\U0001F469\u200d\U0001F467 family",
    "\U0001F44D\U0001F3FD thumbs",
    "\U0001F1FA\U0001F1F8 flag",
    "\U0001F3F4\U000E0067\U000E0062\U000E0073\U000E0063\U000E0074\U000E007F tag flag",
    "\u2764\ufe0f heart",
    "\ufeffBOM \u200b zero width \u00ad soft hyphen",
    "\ue000\U000F0000 private use",
    "\U000E0001 language tag",
    "\uffff\ufffe nonchars",
    "x" * 5000,
    "\t\r\n\v\f\x1c\x85\u2028\u2029",
    "\u3000\u2003 wide spaces",
    "\u0e01\u0e34\u0e4a thai",
    "\u1100\u1161\u11a8 hangul jamo",
    "\U00010000\U0010FFFF planes",
]


@pytest.mark.parametrize("text", TORTURE, ids=range(len(TORTURE)))
def test_torture_never_raises(norm, font, text):
    out = norm(text)
    assert isinstance(out, str)
    assert all(font.has_glyph(ch) or ch == font.replacement for ch in out)


def test_typographic_quotes_become_ascii(norm):
    assert norm("\u201chello\u201d \u2018world\u2019") == "\"hello\" 'world'"


def test_dashes_become_ascii(norm):
    assert norm("a\u2013b\u2014c") == "a-b--c"


def test_ellipsis_becomes_three_dots(norm):
    assert norm("wait\u2026") == "wait..."


def test_accented_letter_loses_accent(norm):
    assert norm("caf\u00e9") == "cafe"


def test_combining_sequence_composes_then_strips(norm):
    assert norm("cafe\u0301") == "cafe"


def test_ligature_decomposes(norm):
    assert norm("\ufb01ne") == "fine"


def test_fullwidth_letters_narrow(norm):
    assert norm("\uff21\uff22") == "AB"


def test_unknown_letter_is_replaced(norm, font):
    assert norm("\u05e9") == font.replacement


def test_emoji_zwj_sequence_is_one_box(norm, font):
    assert norm("\U0001F468\u200d\U0001F469\u200d\U0001F467") == font.replacement


def test_skin_tone_stays_in_cluster(norm, font):
    assert norm("\U0001F44D\U0001F3FD!") == font.replacement + "!"


def test_flag_pair_is_one_box(norm, font):
    assert norm("\U0001F1FA\U0001F1F8") == font.replacement


def test_surrogate_pair_is_one_box(norm, font):
    assert norm("\ud83d\ude00") == font.replacement


def test_control_characters_are_visible(norm, font):
    assert norm("a\x00b") == f"a{font.replacement}b"


def test_format_characters_vanish(norm):
    assert norm("a\u200bb\u200ec\ufeffd\u00ade") == "abcde"


def test_mark_on_unknown_base_is_swallowed(norm, font):
    assert norm("\u05e9\u05bc") == font.replacement


def test_stray_mark_is_dropped(norm):
    assert norm("q\u0308") == "q"


def test_nbsp_becomes_space(norm):
    assert norm("a\u00a0b") == "a b"


def test_ascii_passes_unchanged(norm):
    text = "".join(chr(code) for code in range(0x20, 0x7F))
    assert norm(text) == text


def test_builtin_font_covers_printable_ascii(font):
    missing = [chr(code) for code in range(0x20, 0x7F) if not font.has_glyph(chr(code))]
    assert missing == []


def test_builtin_font_lacks_latin1_letters(font):
    assert not font.has_glyph("\u00e9")


def test_builtin_replacement_is_drawn(font):
    assert font.font.getmask(font.replacement).getbbox() is not None


def test_replacement_differs_from_letter_o(font):
    assert bytes(font.font.getmask(font.replacement)) != bytes(font.font.getmask("O"))
