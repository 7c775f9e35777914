"""The display: layout, render thread, luma.oled panels, page-diff writer, emulators.

``open_display`` builds a ``Display`` from the ``[display]`` settings. Settings that
cannot work (an unknown driver, a size the driver cannot drive, a bad address) raise
ConfigError at once. A panel that is absent or fails later never raises to the
caller, because the render thread logs the failure and retries in the background.
"""

import logging
import time

from appliance.display.clock import ManualClock, as_clock
from appliance.display.devices import DRIVERS, check_settings, open_oled
from appliance.display.emulators import EMULATORS, GifPanel, open_emulator
from appliance.display.fakebus import FakeBus
from appliance.display.idle import IdlePolicy
from appliance.display.layout import Layout
from appliance.display.render import Backoff, Display, DisplayStats
from appliance.display.state import DisplayState
from appliance.errors import ConfigError

__all__ = ["open_display", "Display", "DisplayState", "DisplayStats", "Layout", "FakeBus", "ManualClock",
           "DRIVERS", "EMULATORS"]

log = logging.getLogger(__name__)


def open_display(*, driver: str = "ssd1306", interface: str = "i2c", i2c_port: int = 1,
                 i2c_address="0x3C", spi_port: int = 0, spi_device: int = 0,
                 spi_bus_speed_hz: int = 8000000, gpio_dc: int = 24, gpio_rst: int = 25,
                 width: int = 128, height: int = 64, rotate: int = 0, contrast: int = 255,
                 font: str = "", font_size: int = 10, fps_max: float = 10.0, persist: bool = False,
                 dim_after: float = 60.0, dim_contrast: int = 16, off_after: float = 600.0,
                 output: str = "", clock=time.monotonic, bus: FakeBus | None = None,
                 backoff: Backoff | None = None, stream=None) -> Display:
    """Open the display described by the ``[display]`` settings and start its thread.

    ``driver`` is a luma.oled driver (ssd1306, ssd1309, ssd1315, ssd1316, ssd1305,
    sh1106, sh1107, ch1115) or an emulator (terminal, png, gif, dummy). For drivers,
    ``interface`` is i2c, spi or fake. ``width`` and ``height`` are the panel's native
    size as luma takes it, and ``rotate`` turns the picture by quarter turns clockwise.
    ``i2c_address`` "auto" tries 0x3C, then 0x3D. With interface "fake", ``bus`` is the
    FakeBus to draw on (one is made when None) and is available as ``Display.bus``.

    ``output`` is the file for png and gif (png accepts a ``{n}`` pattern for numbered
    snapshots), or a terminal device for terminal (empty: standard output, or
    ``stream``). ``clock`` is a callable returning seconds or a Clock such as
    ManualClock; it times frames, idle steps and reconnect backoff.
    """
    if not isinstance(driver, str):
        raise ConfigError(f"display driver {driver!r} is invalid: use a driver name")
    if isinstance(rotate, bool) or not isinstance(rotate, int) or rotate not in (0, 1, 2, 3):
        raise ConfigError(f"rotate {rotate!r} is invalid: use 0, 1, 2 or 3 quarter turns clockwise")
    clock = as_clock(clock)
    idle = IdlePolicy(dim_after=dim_after, off_after=off_after)

    if driver in EMULATORS:
        if bus is not None:
            raise ConfigError(f"a bus object works only with a luma driver and interface \"fake\", not {driver}")
        panel = open_emulator(driver, width=width, height=height, rotate=rotate, output=output, stream=stream)
        if isinstance(panel, GifPanel):
            panel.attach_clock(clock)
    else:
        entry = check_settings(driver, interface=interface, width=width, height=height, rotate=rotate,
                               contrast=contrast, i2c_port=i2c_port, i2c_address=i2c_address,
                               spi_port=spi_port, spi_device=spi_device, spi_bus_speed_hz=spi_bus_speed_hz,
                               gpio_dc=gpio_dc, gpio_rst=gpio_rst)
        panel, bus = open_oled(entry, interface=interface, width=width, height=height, rotate=rotate,
                               i2c_port=i2c_port, i2c_address=i2c_address, spi_port=spi_port,
                               spi_device=spi_device, spi_bus_speed_hz=spi_bus_speed_hz, gpio_dc=gpio_dc,
                               gpio_rst=gpio_rst, persist=persist, bus=bus)

    layout = Layout(width=panel.size[0], height=panel.size[1], font_path=font, font_size=font_size)
    log.info("display %s %dx%d, rotate %d, up to %g frames/s", driver, width, height, rotate, fps_max)
    return Display(panel, layout, clock=clock, fps_max=fps_max, persist=persist, contrast=contrast,
                   idle=idle, dim_contrast=dim_contrast, backoff=backoff, bus=bus)
