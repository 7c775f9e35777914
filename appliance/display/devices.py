"""luma.oled devices: the driver registry, settings checks, and the OLED panel.

Drivers are looked up by name in ``DRIVERS`` and their luma class is imported only
when a panel opens. The sizes listed for each driver are the ones its luma.oled 3.x
class accepts; a test checks the table against the installed luma.
"""

import errno
import importlib
import logging
from dataclasses import dataclass, field

from luma.core.error import DeviceNotFoundError
from luma.core.error import DevicePermissionError as LumaPermissionError
from PIL import Image

from appliance.errors import ConfigError
from appliance.display.fakebus import FakeBus
from appliance.display.pagewriter import PAGE, WINDOW, PageWriter, pack_pages
from appliance.display.panel import Panel
from appliance.display.state import DisplayState

__all__ = ["Driver", "DRIVERS", "INTERFACES", "SPI_SPEEDS_HZ", "OledPanel", "parse_i2c_address",
           "check_settings", "open_oled", "is_permission_error"]

log = logging.getLogger(__name__)

_SSD1306_SIZES = ((128, 64), (128, 32), (96, 16), (64, 48), (64, 32))


@dataclass(frozen=True)
class Driver:
    """A monochrome luma.oled driver and how the page writer addresses its RAM."""

    name: str
    sizes: tuple[tuple[int, int], ...]
    addressing: str
    fake: str                         # FakeBus controller model for interface "fake"
    column_offsets: dict = field(default_factory=dict)   # (width, height) -> RAM column of pixel 0
    default_column_offset: int = 0
    module: str = "luma.oled.device"

    def column_offset(self, width: int, height: int) -> int:
        return self.column_offsets.get((width, height), self.default_column_offset)

    def load(self):
        """Import and return the luma device class."""
        return getattr(importlib.import_module(self.module), self.name)

    def describe_sizes(self) -> str:
        return ", ".join(f"{width}x{height}" for width, height in self.sizes)


# Column offsets repeat luma.oled 3.16: SSD1306 64-pixel-wide modes start at column 32,
# SSD1305 128x32 at column 4, and SH1106 and CH1115 at column 2 of their 132.
DRIVERS = {driver.name: driver for driver in (
    Driver("ssd1306", _SSD1306_SIZES, WINDOW, "ssd1306", {(64, 48): 32, (64, 32): 32}),
    Driver("ssd1309", _SSD1306_SIZES, WINDOW, "ssd1306", {(64, 48): 32, (64, 32): 32}),
    Driver("ssd1315", _SSD1306_SIZES, WINDOW, "ssd1306", {(64, 48): 32, (64, 32): 32}),
    Driver("ssd1316", _SSD1306_SIZES, WINDOW, "ssd1306", {(64, 48): 32, (64, 32): 32}),
    Driver("ssd1305", ((128, 64), (128, 32)), WINDOW, "ssd1305", {(128, 32): 4}),
    Driver("sh1106", ((128, 128), (128, 64), (128, 32)), PAGE, "sh1106", default_column_offset=2),
    Driver("sh1107", ((64, 128), (80, 128), (128, 128)), PAGE, "sh1107"),
    # NOTE: the fake models CH1115 as an SH1106 (page addressing, column 2 of 132)
    # because that is how luma drives it. The real CH1115 RAM width is unchecked.
    Driver("ch1115", ((128, 64),), PAGE, "sh1106", default_column_offset=2),
)}

# Interfaces from which a panel can be opened.
INTERFACES = ("i2c", "spi", "fake")

# luma.core's spi() asserts that the bus speed is one of these.
SPI_SPEEDS_HZ = tuple(int(mhz * 1_000_000) for mhz in (
    0.5, 1, 2, 4, 8, 16, 20, 24, 28, 32, 36, 40, 44, 48, 50, 52))

# "auto" tries the two addresses SSD1306 and SH1106 modules can be strapped to.
AUTO_ADDRESSES = (0x3C, 0x3D)


def parse_i2c_address(address) -> tuple[int, ...]:
    """Return the I2C addresses to try for a setting like 0x3C, "0x3D", 60 or "auto"."""
    if isinstance(address, str) and address.strip().lower() == "auto":
        return AUTO_ADDRESSES
    try:
        value = address if isinstance(address, int) and not isinstance(address, bool) else int(str(address), 0)
    except ValueError:
        value = -1
    if not 0x03 <= value <= 0x77:
        raise ConfigError(f"i2c_address {address!r} is invalid: use a 7-bit address such as 0x3C, or \"auto\"")
    return (value,)


def _check_int(name: str, value, low: int, high: int, unit: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{name} {value!r} is invalid: use a whole number from {low} to {high}{unit}")


def check_settings(driver: str, *, interface: str, width: int, height: int, rotate: int, contrast: int,
                   i2c_port: int, i2c_address, spi_port: int, spi_device: int, spi_bus_speed_hz: int,
                   gpio_dc: int, gpio_rst: int) -> Driver:
    """Raise ConfigError for a setting the driver cannot use; return the driver."""
    entry = DRIVERS.get(driver)
    if entry is None:
        raise ConfigError(f"display driver {driver!r} is unknown; use one of {', '.join(DRIVERS)}, "
                          "or an emulator: terminal, png, gif, dummy")
    if (width, height) not in entry.sizes:
        raise ConfigError(f"display driver {driver} cannot drive {width}x{height}; "
                          f"it supports {entry.describe_sizes()}")
    if interface not in INTERFACES:
        raise ConfigError(f"display interface {interface!r} is unknown; use one of {', '.join(INTERFACES)}")
    _check_int("rotate", rotate, 0, 3, " (quarter turns clockwise)")
    _check_int("contrast", contrast, 0, 255)
    if interface == "i2c":
        _check_int("i2c_port", i2c_port, 0, 255)
        parse_i2c_address(i2c_address)
    elif interface == "spi":
        _check_int("spi_port", spi_port, 0, 15)
        _check_int("spi_device", spi_device, 0, 15)
        _check_int("gpio_dc", gpio_dc, 0, 53, " (BCM numbering)")
        _check_int("gpio_rst", gpio_rst, 0, 53, " (BCM numbering)")
        if spi_bus_speed_hz not in SPI_SPEEDS_HZ:
            speeds = ", ".join(str(speed) for speed in SPI_SPEEDS_HZ)
            raise ConfigError(f"spi_bus_speed_hz {spi_bus_speed_hz!r} is invalid; luma accepts {speeds}")
    else:
        parse_i2c_address(i2c_address)
    return entry


class _CountingSerial:
    """Wraps a luma serial interface and counts the bytes written through it."""

    def __init__(self, serial, panel: "OledPanel"):
        self._serial = serial
        self._panel = panel

    def command(self, *cmd):
        self._serial.command(*cmd)
        self._panel.bytes_sent += len(cmd)

    def data(self, data):
        self._serial.data(data)
        self._panel.bytes_sent += len(data)

    def cleanup(self):
        self._serial.cleanup()


class OledPanel(Panel):
    """A luma.oled device driven through the page-diff writer.

    ``connect(address)`` returns a fresh luma serial interface for one I2C address,
    and SPI ignores the address. Each ``open`` makes a new interface and a new luma
    device, which sends the controller's full init sequence.
    """

    def __init__(self, driver: Driver, connect, *, width: int, height: int, rotate: int,
                 addresses: tuple, persist: bool, label: str):
        self.driver = driver
        self._connect = connect
        self.width = width
        self.height = height
        self.rotate = rotate
        self.addresses = addresses
        self.persist = persist
        self.label = label
        self.size = (width, height) if rotate % 2 == 0 else (height, width)
        self.bytes_sent = 0
        self.address: int | None = None
        self._device = None
        self._writer: PageWriter | None = None

    def open(self) -> None:
        self.release()
        device_class = self.driver.load()
        failure: Exception | None = None
        for address in self.addresses:
            serial = _CountingSerial(self._connect(address), self)
            try:
                device = device_class(serial, width=self.width, height=self.height, rotate=self.rotate)
            except (DeviceNotFoundError, OSError) as exc:
                failure = exc
                serial.cleanup()
                continue
            except BaseException:
                serial.cleanup()
                raise
            break
        else:
            raise failure if failure is not None else DeviceNotFoundError(f"no address to try for {self.label}")

        # luma registers an atexit hook that blanks the panel unless `persist` is set.
        device.persist = self.persist
        self._device = device
        self.address = address
        self._writer = PageWriter(device.command, device.data, width=self.width, pages=self.height // 8,
                                  column_offset=self.driver.column_offset(self.width, self.height),
                                  addressing=self.driver.addressing)
        if address is not None:
            log.info("display %s ready at I2C address 0x%02X", self.label, address)
        else:
            log.info("display %s ready", self.label)

    def draw(self, image: Image.Image, state: DisplayState) -> None:
        if self._device is None or self._writer is None:
            raise DeviceNotFoundError(f"display {self.label} is not open")
        try:
            self._writer.write(pack_pages(self._device.preprocess(image)))
        except BaseException:
            self._writer.invalidate()
            raise

    def set_contrast(self, level: int) -> None:
        if self._device is not None:
            self._device.contrast(level)

    def set_power(self, on: bool) -> None:
        if self._device is not None:
            if on:
                self._device.show()
            else:
                self._device.hide()

    def shutdown(self, persist: bool) -> None:
        device = self._device
        if device is not None and not persist:
            blank = Image.new("1", device.size)
            self._writer.write(pack_pages(device.preprocess(blank)))
            device.hide()
        self.release()

    def release(self) -> None:
        device, self._device, self._writer = self._device, None, None
        if device is None:
            return
        # Shutdown is done by now; stop luma's atexit hook from sending anything.
        device.persist = True
        try:
            device.cleanup()
        except OSError as exc:
            log.debug("display %s: closing the bus failed: %s", self.label, exc)


def open_oled(driver: Driver, *, interface: str, width: int, height: int, rotate: int, i2c_port: int,
              i2c_address, spi_port: int, spi_device: int, spi_bus_speed_hz: int, gpio_dc: int,
              gpio_rst: int, persist: bool, bus: FakeBus | None) -> tuple[OledPanel, object]:
    """Return an unopened OledPanel for the settings, and the FakeBus when faked."""
    if bus is not None and interface != "fake":
        raise ConfigError(f"a bus object works only with interface \"fake\", not {interface!r}")
    addresses = parse_i2c_address(i2c_address)
    if interface == "fake":
        if bus is None:
            bus = FakeBus(driver.fake, width, height, address=addresses[0])
        connect = bus.at
        label = f"{driver.name} on fake bus"
    elif interface == "i2c":
        def connect(address):
            from luma.core.interface.serial import i2c
            return i2c(port=i2c_port, address=address)
        label = f"{driver.name} on /dev/i2c-{i2c_port}"
    else:
        addresses = (None,)

        def connect(_address):
            from luma.core.interface.serial import spi
            return spi(port=spi_port, device=spi_device, bus_speed_hz=spi_bus_speed_hz,
                       gpio_DC=gpio_dc, gpio_RST=gpio_rst)
        label = f"{driver.name} on /dev/spidev{spi_port}.{spi_device}"
    panel = OledPanel(driver, connect, width=width, height=height, rotate=rotate, addresses=addresses,
                      persist=persist, label=label)
    return panel, bus


def is_permission_error(exc: BaseException) -> bool:
    """Return True for a failure that needs the service user's groups fixed."""
    return isinstance(exc, (PermissionError, LumaPermissionError)) or \
        getattr(exc, "errno", None) in (errno.EACCES, errno.EPERM)
