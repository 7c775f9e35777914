"""Incremental UTF-8 text of a token sequence, with rewind.

A token's piece is raw bytes, and one character (an emoji, an accented letter) may be
split over several tokens. The text shown holds back an incomplete trailing sequence
until the token that completes it arrives, so a character appears once, never as
U+FFFD and never dropped. Bytes that can never form a character become U+FFFD, as
bytes.decode("utf-8", "replace") would make them.
"""

from __future__ import annotations

import codecs


def _decoder():
    return codecs.getincrementaldecoder("utf-8")(errors="replace")


class TokenText:
    """The generated tokens' pieces and the text they make so far."""

    def __init__(self):
        self.pieces: list[bytes] = []
        self.text = ""
        self._decoder = _decoder()

    def __len__(self) -> int:
        return len(self.pieces)

    def append(self, piece: bytes) -> str:
        """Add one token's piece and return the text it completes (may be "")."""
        self.pieces.append(piece)
        added = self._decoder.decode(piece, final=False)
        self.text += added
        return added

    def truncate(self, n_tokens: int) -> str:
        """Keep the first ``n_tokens`` pieces and return the text that disappeared."""
        if n_tokens >= len(self.pieces):
            return ""
        del self.pieces[n_tokens:]
        old = self.text
        self._decoder = _decoder()
        self.text = self._decoder.decode(b"".join(self.pieces), final=False)
        return old[len(self.text):]

    def clear(self) -> None:
        self.pieces.clear()
        self.text = ""
        self._decoder = _decoder()
