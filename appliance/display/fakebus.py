"""A bus-level fake of SSD1306, SH1106 and SH1107 OLED controllers.

``FakeBus`` takes the place of luma's ``i2c`` or ``spi`` serial interface: luma devices
and the page writer call ``command(*bytes)`` and ``data(list)`` on it. It decodes the
bytes the way the controller does (addressing modes, column and page pointers, display
on/off, contrast, start line) into a RAM image, so a test can compare what the panel
would show against the frame that was meant, count the bytes a frame costs, and make
writes fail the way a loose I2C cable does.

Errors mirror luma.core 2.x ``i2c``: a failed command write raises
``luma.core.error.DeviceNotFoundError`` (luma translates errno 121, EREMOTEIO, into it)
and a failed data write raises a plain ``OSError`` with errno 121.
"""

import errno
import os
import threading
from collections import Counter
from dataclasses import dataclass

from luma.core.error import DeviceNotFoundError
from PIL import Image

__all__ = ["FakeBus", "CONTROLLERS"]


@dataclass(frozen=True)
class Controller:
    """RAM geometry and command dialect of one controller family."""

    name: str
    ram_columns: int
    ram_pages: int
    # SSD1306-style 0x20 memory mode with 0x21/0x22 windows, versus page addressing.
    window_addressing: bool


CONTROLLERS = {
    "ssd1306": Controller("ssd1306", ram_columns=128, ram_pages=8, window_addressing=True),
    # SSD1305 has 132 columns of RAM; 128x32 modules start at column 4.
    "ssd1305": Controller("ssd1305", ram_columns=132, ram_pages=8, window_addressing=True),
    # SH1106 has 132 columns of RAM and no horizontal addressing mode.
    "sh1106": Controller("sh1106", ram_columns=132, ram_pages=8, window_addressing=False),
    # SH1107 has 128 columns by 16 pages and page or vertical addressing.
    "sh1107": Controller("sh1107", ram_columns=128, ram_pages=16, window_addressing=False),
}


def _panel_column_offset(controller: str, width: int, height: int) -> int:
    """Return the RAM column that common modules wire to the panel's column 0."""
    if controller == "sh1106":
        return 2  # 128 of the 132 columns, centred
    if controller == "ssd1305" and (width, height) == (128, 32):
        return 4
    if controller == "ssd1306" and width == 64:
        return 32  # 64x48 and 64x32 modules use the middle of the 128 columns
    return 0


# Argument byte counts of multi-byte commands; every other opcode takes none.
_SSD1306_ARGS = {
    0x20: 1, 0x21: 2, 0x22: 2, 0x26: 6, 0x27: 6, 0x29: 5, 0x2A: 5, 0x81: 1, 0x8D: 1,
    0xA3: 2, 0xA8: 1, 0xAD: 1, 0xD3: 1, 0xD5: 1, 0xD6: 1, 0xD9: 1, 0xDA: 1, 0xDB: 1, 0xFD: 1,
}
_SH1106_ARGS = {0x81: 1, 0xA8: 1, 0xAD: 1, 0xD3: 1, 0xD5: 1, 0xD9: 1, 0xDA: 1, 0xDB: 1}
_SH1107_ARGS = {0x81: 1, 0xA8: 1, 0xAD: 1, 0xD3: 1, 0xD5: 1, 0xD9: 1, 0xDA: 1, 0xDB: 1, 0xDC: 1}

# Opcodes each dialect defines. Any other byte is recorded in ``unknown_commands``
# and treated as a one-byte no-op. luma's SH1106 init sends 0x20 and 0x8D, which the
# SH1106 datasheet does not list.
_SSD1306_SINGLE = set(range(0x00, 0x20)) | set(range(0x40, 0x80)) | set(range(0xB0, 0xB8)) | {
    0x2E, 0x2F, 0xA0, 0xA1, 0xA4, 0xA5, 0xA6, 0xA7, 0xAE, 0xAF, 0xC0, 0xC8, 0xE3}
_SH1106_SINGLE = set(range(0x00, 0x20)) | set(range(0x30, 0x34)) | set(range(0x40, 0x80)) | \
    set(range(0xB0, 0xB8)) | set(range(0xC0, 0xD0)) | {0xA0, 0xA1, 0xA4, 0xA5, 0xA6, 0xA7, 0xAE, 0xAF, 0xE0, 0xE3, 0xEE}
_SH1107_SINGLE = set(range(0x00, 0x18)) | {0x20, 0x21} | set(range(0xB0, 0xC0)) | set(range(0xC0, 0xD0)) | {
    0xA0, 0xA1, 0xA4, 0xA5, 0xA6, 0xA7, 0xAE, 0xAF, 0xE0, 0xE3, 0xEE}

_HORIZONTAL, _VERTICAL, _PAGE = 0, 1, 2


class _AbsentDevice:
    """A serial interface at an address with nothing on it: every write fails."""

    def __init__(self, address: int):
        self.address = address

    def command(self, *cmd):
        raise DeviceNotFoundError(f"I2C device not found on address: 0x{self.address:02X}")

    def data(self, data):
        raise OSError(errno.EREMOTEIO, os.strerror(errno.EREMOTEIO))

    def cleanup(self):
        pass


class FakeBus:
    """A fake OLED controller behind luma's serial interface (``command``, ``data``).

    ``controller`` is one of ``CONTROLLERS``. ``width`` and ``height`` are the panel's
    size in its native orientation. ``column_offset`` is the RAM column wired to the
    panel's column 0, and None picks what common modules use (2 for SH1106). The fake
    is thread-safe, so a render thread may write while a test reads ``image()``.
    """

    def __init__(self, controller: str = "ssd1306", width: int = 128, height: int = 64,
                 *, address: int = 0x3C, column_offset: int | None = None):
        if controller not in CONTROLLERS:
            raise ValueError(f"fake controller {controller!r} is unknown; use one of {', '.join(CONTROLLERS)}")
        self.model = CONTROLLERS[controller]
        if column_offset is None:
            column_offset = _panel_column_offset(controller, width, height)
        if height % 8 or height > self.model.ram_pages * 8 or column_offset + width > self.model.ram_columns:
            raise ValueError(f"a {width}x{height} panel at column {column_offset} does not fit "
                             f"{controller} RAM of {self.model.ram_columns}x{self.model.ram_pages * 8}")
        self.controller = controller
        self.width = width
        self.height = height
        self.address = address
        self.column_offset = column_offset
        if controller == "sh1107":
            self._args, self._single = _SH1107_ARGS, _SH1107_SINGLE
        elif self.model.window_addressing:
            self._args, self._single = _SSD1306_ARGS, _SSD1306_SINGLE
        else:
            self._args, self._single = _SH1106_ARGS, _SH1106_SINGLE

        self._lock = threading.Lock()
        self.command_bytes = 0
        self.data_bytes = 0
        self.command_calls = 0
        self.data_calls = 0
        self.opcodes: Counter = Counter()
        self.unknown_commands: list[int] = []
        self.overruns = 0  # data bytes written past the last RAM column (SH1106)
        self.closed = False
        self._plugged = True
        self._fail_commands = 0
        self._fail_data = 0
        self._power_on()

    # -- fault injection -------------------------------------------------------

    def unplug(self) -> None:
        """Disconnect the panel: every write fails until ``plug``."""
        with self._lock:
            self._plugged = False

    def plug(self) -> None:
        """Reconnect the panel. It powers up as after a cable fault: off, RAM random."""
        with self._lock:
            self._plugged = True
            self._power_on()

    def fail_next_command(self, count: int = 1) -> None:
        """Make the next ``count`` command writes fail as luma reports errno 121."""
        with self._lock:
            self._fail_commands += count

    def fail_next_data(self, count: int = 1) -> None:
        """Make the next ``count`` data writes fail with OSError errno 121."""
        with self._lock:
            self._fail_data += count

    def at(self, address: int):
        """Return the serial interface for ``address``: this fake, or an absent device."""
        return self if address == self.address else _AbsentDevice(address)

    # -- luma serial interface -------------------------------------------------

    def command(self, *cmd: int) -> None:
        """Decode command bytes, as a controller does with the D/C line low."""
        with self._lock:
            if not self._plugged or self._fail_commands:
                self._fail_commands = max(0, self._fail_commands - 1)
                raise DeviceNotFoundError(f"I2C device not found on address: 0x{self.address:02X}")
            self.command_calls += 1
            self.command_bytes += len(cmd)
            for byte in cmd:
                self._command_byte(int(byte) & 0xFF)

    def data(self, data) -> None:
        """Write display RAM at the current pointers, advancing them per byte."""
        with self._lock:
            if not self._plugged or self._fail_data:
                self._fail_data = max(0, self._fail_data - 1)
                raise OSError(errno.EREMOTEIO, os.strerror(errno.EREMOTEIO))
            self.data_calls += 1
            self.data_bytes += len(data)
            for byte in data:
                self._data_byte(int(byte) & 0xFF)

    def cleanup(self) -> None:
        """Release the bus; luma calls this from ``device.cleanup``."""
        self.closed = True

    # -- what the panel shows --------------------------------------------------

    @property
    def bytes_sent(self) -> int:
        """Command plus data bytes received since creation."""
        return self.command_bytes + self.data_bytes

    @property
    def inits(self) -> int:
        """Init sequences received, counted by their set-multiplex-ratio command."""
        return self.opcodes[0xA8]

    def image(self) -> Image.Image:
        """Return the panel's pixels as a mode "1" image, in panel orientation.

        This is RAM as the panel maps it: the display start line shifts rows, while
        on/off, contrast and inversion are reported separately as ``is_on``,
        ``contrast`` and ``inverted``.
        """
        with self._lock:
            ram = [bytes(page) for page in self._ram]
            start_line = self.start_line
        image = Image.new("1", (self.width, self.height))
        pixels = image.load()
        ram_rows = self.model.ram_pages * 8
        for y in range(self.height):
            row = (y + start_line) % ram_rows
            page, bit = divmod(row, 8)
            for x in range(self.width):
                if ram[page][self.column_offset + x] >> bit & 1:
                    pixels[x, y] = 255
        return image

    # -- controller model ------------------------------------------------------

    def _power_on(self) -> None:
        # RAM content after power-up is undefined; a fixed stripe pattern makes any
        # page that is not rewritten stand out in a comparison.
        self._ram = [bytearray([0x55 if page % 2 else 0xAA]) * self.model.ram_columns
                     for page in range(self.model.ram_pages)]
        self.is_on = False
        # Reset contrast: 0x7F on SSD130x, 0x80 on SH110x.
        self.contrast = 0x7F if self.model.window_addressing else 0x80
        self.inverted = False
        self.start_line = 0
        self.addressing_mode = _PAGE  # the reset default of every model here
        self.column = 0
        self.page = 0
        self.column_start, self.column_end = 0, self.model.ram_columns - 1
        self.page_start, self.page_end = 0, self.model.ram_pages - 1
        self._pending: list[int] = []

    def _command_byte(self, byte: int) -> None:
        if self._pending:
            self._pending.append(byte)
            if len(self._pending) == self._args[self._pending[0]] + 1:
                opcode, *args = self._pending
                self._pending = []
                self._apply_with_args(opcode, args)
            return
        if byte in self._args:
            self.opcodes[byte] += 1
            self._pending = [byte]
            return
        if byte not in self._single:
            self.unknown_commands.append(byte)
            return
        self.opcodes[byte] += 1
        self._apply(byte)

    def _apply(self, opcode: int) -> None:
        if opcode <= 0x0F:
            self.column = (self.column & 0xF0) | opcode
        elif opcode <= 0x1F and (self.controller != "sh1107" or opcode <= 0x17):
            self.column = ((opcode & 0x0F) << 4) | (self.column & 0x0F)
        elif self.controller == "sh1107" and opcode in (0x20, 0x21):
            self.addressing_mode = _PAGE if opcode == 0x20 else _VERTICAL
        elif 0x40 <= opcode <= 0x7F and self.controller != "sh1107":
            self.start_line = opcode & 0x3F
        elif 0xB0 <= opcode <= 0xBF:
            self.page = (opcode & 0x0F) % self.model.ram_pages
        elif opcode in (0xAE, 0xAF):
            self.is_on = opcode == 0xAF
        elif opcode in (0xA6, 0xA7):
            self.inverted = opcode == 0xA7

    def _apply_with_args(self, opcode: int, args: list[int]) -> None:
        if opcode == 0x81:
            self.contrast = args[0]
        elif opcode == 0xDC:
            self.start_line = args[0] & 0x7F
        elif not self.model.window_addressing:
            return
        elif opcode == 0x20:
            self.addressing_mode = args[0] & 0x03 if args[0] & 0x03 != 3 else _PAGE
        elif opcode == 0x21:
            self.column_start = args[0] % self.model.ram_columns
            self.column_end = args[1] % self.model.ram_columns
            self.column = self.column_start
        elif opcode == 0x22:
            self.page_start = args[0] % self.model.ram_pages
            self.page_end = args[1] % self.model.ram_pages
            self.page = self.page_start

    def _data_byte(self, byte: int) -> None:
        if self.column >= self.model.ram_columns:
            self.overruns += 1
            return
        self._ram[self.page][self.column] = byte
        mode = self.addressing_mode
        if not self.model.window_addressing:
            if mode == _VERTICAL:
                self.page = (self.page + 1) % self.model.ram_pages
            else:
                # Page addressing: the column pointer stops being useful past the
                # last RAM column; later bytes count as overruns.
                self.column += 1
            return
        if mode == _HORIZONTAL:
            if self.column >= self.column_end:
                self.column = self.column_start
                self.page = self.page_start if self.page >= self.page_end else self.page + 1
            else:
                self.column += 1
        elif mode == _VERTICAL:
            if self.page >= self.page_end:
                self.page = self.page_start
                self.column = self.column_start if self.column >= self.column_end else self.column + 1
            else:
                self.page += 1
        else:
            self.column = (self.column + 1) % self.model.ram_columns
