"""Word wrapping for the text area, incremental for a story that only grows.

Words break at spaces and line breaks and are split by character only when a word is
wider than a whole line. A story grows one token per detent. With greedy wrapping,
appending text changes only the last line, or the lines of a long word split across
several. So ``Wrapper`` keeps the lines it has already wrapped and re-wraps from the
start of the last line that begins a word, and the cost of a frame depends on the size
of the token, not the size of the story.
"""

import re
import unicodedata
from dataclasses import dataclass
from typing import Callable

__all__ = ["Wrapper"]

_NEWLINES = "\n\v\f\x1c\x1d\x1e\x85\u2028\u2029"
_SPACES = " \t\u1680\u2000-\u200a\u205f\u3000"

# One token: a line break, a run of breaking spaces, a carriage return (dropped, so
# "\r\n" counts once), or a word (anything else up to the next break).
_TOKEN = re.compile(f"(?P<newline>[{_NEWLINES}])|(?P<space>[{_SPACES}]+)|(?P<cr>\r+)|(?P<word>[^{_NEWLINES}{_SPACES}\r]+)")

_WORD_CACHE_SIZE = 4096


@dataclass(frozen=True)
class _Line:
    text: str
    # Index in the raw text where wrapping can restart to reproduce this line and
    # every line after it, or None for a line that continues a split long word.
    resume_at: int | None
    # True when the line starts a paragraph, so leading spaces are drawn.
    paragraph_start: bool


class Wrapper:
    """Wrap raw story text into lines at most ``width`` pixels wide.

    ``measure(text)`` returns a width in pixels and ``normalise(word)`` maps a raw word
    to drawable characters; both come from the display font. ``wrap`` returns at
    least the last ``keep`` lines.
    """

    def __init__(self, width: int, measure: Callable[[str], float], normalise: Callable[[str], str], keep: int):
        if width <= 0:
            raise ValueError(f"wrap width {width} is invalid: it must be positive")
        if keep <= 0:
            raise ValueError(f"wrap keep {keep} is invalid: it must be positive")
        self.width = width
        self.keep = keep
        self._measure = measure
        self._normalise = normalise
        self._words: dict[str, str] = {}
        self._text = ""
        self._lines: list[_Line] = [_Line("", 0, True)]

    def wrap(self, text: str) -> list[str]:
        """Return the last ``keep`` lines of ``text`` wrapped to the width."""
        if text.startswith(self._text):
            lines = self._resume(text)
        else:
            lines = list(self._wrap_from(text, 0, True))
        self._text = text
        self._lines = self._trim(lines)
        return [line.text for line in self._lines[-self.keep:]]

    def wrap_all(self, text: str) -> list[str]:
        """Return every line of ``text``, wrapped from the start without the cache."""
        return [line.text for line in self._wrap_from(text, 0, True)]

    def _resume(self, text: str) -> list[_Line]:
        for index in range(len(self._lines) - 1, -1, -1):
            line = self._lines[index]
            if line.resume_at is not None:
                kept = self._lines[:index]
                return kept + list(self._wrap_from(text, line.resume_at, line.paragraph_start))
        return list(self._wrap_from(text, 0, True))

    def _trim(self, lines: list[_Line]) -> list[_Line]:
        # Keep the last `keep` lines for drawing, and reach back far enough to keep
        # the last line that wrapping can restart from.
        first = max(0, len(lines) - self.keep)
        while first > 0 and lines[first].resume_at is None:
            first -= 1
        last_resumable = len(lines) - 1
        while last_resumable > 0 and lines[last_resumable].resume_at is None:
            last_resumable -= 1
        return lines[min(first, last_resumable):]

    def _word(self, raw: str) -> str:
        word = self._words.get(raw)
        if word is None:
            word = self._normalise(raw)
            if len(self._words) >= _WORD_CACHE_SIZE:
                self._words.clear()
            self._words[raw] = word
        return word

    def _fits(self, text: str) -> bool:
        return self._measure(text) <= self.width

    def _wrap_from(self, text: str, position: int, paragraph_start: bool):
        """Yield the lines of ``text[position:]``, starting on a fresh line."""
        line = ""
        line_resume: int | None = position
        line_paragraph = paragraph_start
        space = ""

        for match in _TOKEN.finditer(text, position):
            kind = match.lastgroup
            if kind == "newline":
                yield _Line(line, line_resume, line_paragraph)
                line, line_resume, line_paragraph, space = "", match.end(), True, ""
                continue
            if kind == "space":
                space += " " * len(match.group())
                continue
            if kind == "cr":
                continue

            word = self._word(match.group())
            if line or line_paragraph:
                candidate = line + space + word
            else:
                candidate = word
            space = ""
            if self._fits(candidate):
                line = candidate
                continue

            # The word goes on a new line, and the spaces before it are dropped.
            if line:
                yield _Line(line, line_resume, line_paragraph)
            line, line_resume, line_paragraph = "", match.start(), False
            if self._fits(word):
                line = word
                continue

            chunks = self._split(word)
            if len(chunks) == 1:
                # One character wider than the line: draw it clipped.
                line = word
                continue
            yield _Line(chunks[0], match.start(), False)
            for chunk in chunks[1:-1]:
                yield _Line(chunk, None, False)
            line, line_resume = chunks[-1], None
        yield _Line(line, line_resume, line_paragraph)

    def _split(self, word: str) -> list[str]:
        """Split a word wider than a line into line-wide chunks, never before a mark."""
        chunks: list[str] = []
        current = ""
        for ch in word:
            if current and not unicodedata.combining(ch) and not self._fits(current + ch):
                chunks.append(current)
                current = ch
            else:
                current += ch
        chunks.append(current)
        return chunks
