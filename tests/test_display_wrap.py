"""Word wrapping, measured in characters of a monospace font: 1 px per character."""

import random

import pytest

from appliance.display.wrap import Wrapper


def make(width=10, keep=100):
    return Wrapper(width, len, lambda word: word, keep)


def test_words_fill_lines():
    assert make().wrap("one two three four") == ["one two", "three four"]


def test_word_exactly_line_wide_fits():
    assert make().wrap("abcdefghij k") == ["abcdefghij", "k"]


def test_long_word_starts_new_line_and_splits():
    assert make().wrap("ab abcdefghijklmnopqrstuvwxyz") == ["ab", "abcdefghij", "klmnopqrst", "uvwxyz"]


def test_long_word_continues_with_next_word():
    assert make().wrap("abcdefghijklm no") == ["abcdefghij", "klm no"]


def test_newline_breaks_line():
    assert make().wrap("a\nb") == ["a", "b"]


def test_blank_line_is_kept():
    assert make().wrap("a\n\nb") == ["a", "", "b"]


def test_trailing_newline_opens_empty_line():
    assert make().wrap("a\n") == ["a", ""]


def test_crlf_counts_once():
    assert make().wrap("a\r\nb") == ["a", "b"]


def test_spaces_at_break_are_dropped():
    assert make().wrap("abcdefgh     ijk") == ["abcdefgh", "ijk"]


def test_paragraph_indent_is_kept():
    assert make().wrap("  ab\n  cd") == ["  ab", "  cd"]


def test_empty_text_is_one_empty_line():
    assert make().wrap("") == [""]


def test_keep_limits_lines():
    assert make(keep=2).wrap("a\nb\nc\nd") == ["c", "d"]


def test_split_keeps_combining_mark_with_base():
    wrapper = Wrapper(3, lambda s: sum(1 for c in s if c != "\u0301"), lambda w: w, 10)
    assert wrapper.wrap("abce\u0301fg") == ["abc", "e\u0301fg"]


def test_normalise_applies_per_word():
    wrapper = Wrapper(10, len, str.upper, 10)
    assert wrapper.wrap("ab cd") == ["AB CD"]


def test_rewrap_after_non_prefix_change():
    wrapper = make()
    wrapper.wrap("hello there world")
    assert wrapper.wrap("bye") == ["bye"]


def random_story(rng, tokens):
    pieces = ["the", " cat", " sat", "\n", " on", "\n\n", " a", "mat", " supercalifragilistic",
              "expialidocious", "  ", " ", ",", ".", "\r\n", "x" * 25, " y" * 3, "\t", "\u00e9"]
    return [rng.choice(pieces) for _ in range(tokens)]


@pytest.mark.parametrize("seed", range(20))
def test_incremental_equals_full_wrap(seed):
    rng = random.Random(seed)
    wrapper = make(width=12, keep=5)
    text = ""
    for piece in random_story(rng, 300):
        text += piece
        incremental = wrapper.wrap(text)
        full = make(width=12, keep=5).wrap_all(text)[-5:]
        assert incremental == full, repr(text)


def test_incremental_wrap_measures_only_the_tail():
    calls = []

    def measure(text):
        calls.append(text)
        return len(text)

    wrapper = Wrapper(20, measure, lambda w: w, 4)
    text = " ".join(["word"] * 2000)
    wrapper.wrap(text)
    calls.clear()
    wrapper.wrap(text + " more")
    assert len(calls) < 10
