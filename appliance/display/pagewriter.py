"""Page-diff writer: send only the parts of a frame that changed since the last one.

SSD1306-class and SH1106-class controllers store the picture in pages: bands of 8 rows,
one byte per column, bit 0 the top row. luma.oled's ``display()`` sends every page of
every frame (1,024 data bytes for 128x64). A story that grows by one word changes one
line of text and the status bar, so most of those bytes repeat what the controller
already holds. ``PageWriter`` remembers the last frame it sent and sends only the
columns that differ, using the controller's own addressing commands:

* window addressing (SSD1306, SSD1309, SSD1315, SSD1305): in horizontal addressing mode,
  which luma's init selects, ``0x21 start end`` and ``0x22 start end`` set a column
  and page window and the data fills it left to right, top page first. Neighbouring
  pages can share one window when that costs fewer bytes.
* page addressing (SH1106, SH1107, CH1115): there is no window command, so each
  page is selected with ``0xB0 | page`` and the start column with ``0x00 | low nibble``
  and ``0x10 | high nibble``. Writes then run to the right.

``column_offset`` is where the panel's column 0 sits in controller RAM: SH1106 has 132
columns of RAM and a 128-pixel panel is usually wired to columns 2..129.
"""

from typing import Callable, Sequence

from PIL import Image

__all__ = ["PageWriter", "pack_pages", "WINDOW", "PAGE"]

WINDOW = "window"
PAGE = "page"

SET_COLUMN_WINDOW = 0x21
SET_PAGE_WINDOW = 0x22
SET_PAGE = 0xB0
SET_LOW_COLUMN = 0x00
SET_HIGH_COLUMN = 0x10

# Command bytes spent to start one write.
_WINDOW_OVERHEAD = 6
_PAGE_OVERHEAD = 3


def pack_pages(image: Image.Image) -> list[bytes]:
    """Return the controller pages of a mode "1" image, one ``bytes`` per page.

    ``image`` is in panel orientation (after any rotation) and its height is a
    multiple of 8. Byte ``x`` of page ``p`` contains pixels (x, 8p) .. (x, 8p + 7), the top
    pixel in bit 0.
    """
    width, height = image.size
    pages = height // 8
    # Rotating 90 degrees clockwise turns each pixel column into a row whose bytes
    # run from the bottom page up, each with the bottom pixel in bit 7, which is the
    # controller's byte layout with the pages in reverse order.
    packed = image.convert("1").transpose(Image.Transpose.ROTATE_270).tobytes()
    return [packed[pages - 1 - page::pages] for page in range(pages)]


def _runs(old: bytes | None, new: bytes, gap: int) -> list[tuple[int, int]]:
    """Return inclusive column ranges where ``new`` differs from ``old``.

    Ranges separated by at most ``gap`` unchanged bytes are merged, because starting
    a new write costs ``gap`` command bytes.
    """
    if old is None:
        return [(0, len(new) - 1)]
    runs: list[tuple[int, int]] = []
    for column, (before, after) in enumerate(zip(old, new)):
        if before == after:
            continue
        if runs and column - runs[-1][1] - 1 <= gap:
            runs[-1] = (runs[-1][0], column)
        else:
            runs.append((column, column))
    return runs


class PageWriter:
    """Sends frames to a page-organised controller, changed columns only.

    ``command(*bytes)`` and ``data(list)`` are the luma device's own methods (or any
    luma serial interface). The writer assumes controller RAM contains the last frame
    it wrote; call ``invalidate`` after a re-initialisation or a failed write so the
    next frame is sent whole.
    """

    def __init__(self, command: Callable[..., None], data: Callable[[list], None], *,
                 width: int, pages: int, column_offset: int, addressing: str):
        if addressing not in (WINDOW, PAGE):
            raise ValueError(f"addressing {addressing!r} is invalid: use {WINDOW!r} or {PAGE!r}")
        if width <= 0 or pages <= 0 or column_offset < 0:
            raise ValueError(f"panel geometry {width} columns x {pages} pages at offset {column_offset} is invalid")
        self._command = command
        self._data = data
        self.width = width
        self.pages = pages
        self.column_offset = column_offset
        self.addressing = addressing
        self._previous: list[bytes] | None = None

    def invalidate(self) -> None:
        """Forget what the controller holds, so the next frame is sent in full."""
        self._previous = None

    def write(self, pages: Sequence[bytes]) -> bool:
        """Send the changed parts of ``pages``; return False when nothing changed."""
        if len(pages) != self.pages or any(len(page) != self.width for page in pages):
            raise ValueError(f"frame is not {self.pages} pages of {self.width} columns")
        previous = self._previous
        # Until the write completes, RAM contains a mix of both frames.
        self._previous = None
        if self.addressing == WINDOW:
            sent = self._write_windows(previous, pages)
        else:
            sent = self._write_pages(previous, pages)
        self._previous = list(pages)
        return sent

    def _write_pages(self, previous, pages) -> bool:
        sent = False
        for page, new in enumerate(pages):
            old = previous[page] if previous is not None else None
            for start, end in _runs(old, new, _PAGE_OVERHEAD):
                column = self.column_offset + start
                self._command(SET_PAGE | page, SET_LOW_COLUMN | (column & 0x0F), SET_HIGH_COLUMN | (column >> 4))
                self._data(list(new[start:end + 1]))
                sent = True
        return sent

    def _write_windows(self, previous, pages) -> bool:
        changed = []
        for page, new in enumerate(pages):
            old = previous[page] if previous is not None else None
            runs = _runs(old, new, _WINDOW_OVERHEAD)
            if runs:
                changed.append((page, runs))
        if not changed:
            return False
        for first_page, last_page, start, end, runs in self._plan(changed):
            if first_page == last_page:
                for run_start, run_end in runs:
                    self._send_window(pages, first_page, last_page, run_start, run_end)
            else:
                self._send_window(pages, first_page, last_page, start, end)
        return True

    def _send_window(self, pages, first_page, last_page, start, end) -> None:
        offset = self.column_offset
        self._command(SET_COLUMN_WINDOW, offset + start, offset + end, SET_PAGE_WINDOW, first_page, last_page)
        payload = bytearray()
        for page in range(first_page, last_page + 1):
            payload += pages[page][start:end + 1]
        self._data(list(payload))

    @staticmethod
    def _plan(changed):
        """Group changed pages into windows with the fewest bytes on the bus.

        A window over several pages rewrites every page between them across the
        union of their columns, while a single page can take one window per run.
        With at most 16 pages, trying every split of the changed pages is cheap.
        """
        count = len(changed)

        def single_cost(runs):
            return sum(_WINDOW_OVERHEAD + end - start + 1 for start, end in runs)

        best = [0] * (count + 1)
        choice = [0] * (count + 1)
        for stop in range(1, count + 1):
            best[stop] = -1
            for begin in range(stop):
                group = changed[begin:stop]
                if len(group) == 1:
                    cost = single_cost(group[0][1])
                else:
                    start = min(runs[0][0] for _, runs in group)
                    end = max(runs[-1][1] for _, runs in group)
                    rows = group[-1][0] - group[0][0] + 1
                    cost = _WINDOW_OVERHEAD + rows * (end - start + 1)
                if best[stop] < 0 or best[begin] + cost < best[stop]:
                    best[stop] = best[begin] + cost
                    choice[stop] = begin

        plan = []
        stop = count
        while stop > 0:
            begin = choice[stop]
            group = changed[begin:stop]
            start = min(runs[0][0] for _, runs in group)
            end = max(runs[-1][1] for _, runs in group)
            plan.append((group[0][0], group[-1][0], start, end, group[0][1]))
            stop = begin
        plan.reverse()
        return plan
