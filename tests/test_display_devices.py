"""Driver registry, settings checks and opening panels through open_display."""

import pytest
from luma.core.error import DeviceDisplayModeError
from luma.core.interface.serial import noop

from appliance.display import open_display
from appliance.display.devices import DRIVERS, SPI_SPEEDS_HZ, parse_i2c_address
from appliance.display.fakebus import FakeBus
from appliance.errors import ConfigError

CANDIDATE_SIZES = [(w, h) for w in (64, 80, 96, 128) for h in (16, 32, 48, 64, 128)]


@pytest.mark.parametrize("name", sorted(DRIVERS))
def test_registry_sizes_match_luma(name):
    driver = DRIVERS[name]
    device_class = driver.load()
    accepted = []
    for width, height in CANDIDATE_SIZES:
        try:
            device_class(noop(), width=width, height=height)
        except DeviceDisplayModeError:
            continue
        accepted.append((width, height))
    assert sorted(accepted) == sorted(driver.sizes)


def test_registry_has_required_drivers():
    assert {"ssd1306", "sh1106", "ssd1309", "ssd1315", "sh1107"} <= set(DRIVERS)


def test_unknown_driver_lists_drivers():
    with pytest.raises(ConfigError, match="ssd1306"):
        open_display(driver="ssd9999", interface="fake")


def test_unsupported_size_names_driver_and_sizes():
    with pytest.raises(ConfigError, match=r"sh1106 cannot drive 96x16; it supports 128x128, 128x64, 128x32"):
        open_display(driver="sh1106", interface="fake", width=96, height=16)


def test_unknown_interface():
    with pytest.raises(ConfigError, match="interface"):
        open_display(driver="ssd1306", interface="usb")


def test_bad_rotate():
    with pytest.raises(ConfigError, match="rotate"):
        open_display(driver="ssd1306", interface="fake", rotate=4)


def test_bad_contrast():
    with pytest.raises(ConfigError, match="contrast"):
        open_display(driver="ssd1306", interface="fake", contrast=300)


def test_bad_spi_speed():
    with pytest.raises(ConfigError, match="spi_bus_speed_hz"):
        open_display(driver="ssd1306", interface="spi", spi_bus_speed_hz=3_000_000)


def test_spi_speeds_include_default():
    assert 8_000_000 in SPI_SPEEDS_HZ


def test_bus_with_real_interface():
    with pytest.raises(ConfigError, match="fake"):
        open_display(driver="ssd1306", interface="i2c", bus=FakeBus())


def test_bad_fps():
    with pytest.raises(ConfigError, match="fps_max"):
        open_display(driver="dummy", fps_max=0)


def test_bad_idle_delay():
    with pytest.raises(ConfigError, match="dim_after"):
        open_display(driver="dummy", dim_after=-1)


@pytest.mark.parametrize("setting, expected", [
    ("0x3C", (0x3C,)), ("0x3d", (0x3D,)), (60, (60,)), ("61", (61,)), ("auto", (0x3C, 0x3D)), (" AUTO ", (0x3C, 0x3D)),
])
def test_parse_address(setting, expected):
    assert parse_i2c_address(setting) == expected


@pytest.mark.parametrize("setting", ["0x80", "zz", "", -1, 0x02, True])
def test_parse_address_rejects(setting):
    with pytest.raises(ConfigError, match="i2c_address"):
        parse_i2c_address(setting)


def test_auto_address_finds_0x3d():
    bus = FakeBus("ssd1306", address=0x3D)
    display = open_display(driver="ssd1306", interface="fake", i2c_address="auto", bus=bus)
    try:
        display.flush(5)
        assert display.panel.address == 0x3D
        assert display.stats.connected
    finally:
        display.close()


def test_fake_bus_is_created_for_driver():
    display = open_display(driver="sh1106", interface="fake")
    try:
        assert display.bus.controller == "sh1106"
        assert display.bus.column_offset == 2
    finally:
        display.close()


def test_rotated_panel_draws_logical_size():
    display = open_display(driver="sh1107", interface="fake", width=64, height=128, rotate=1)
    try:
        assert display.layout.width == 128
        assert display.layout.height == 64
    finally:
        display.close()


def test_i2c_without_bus_device_keeps_running(tmp_path):
    # Port 250 has no /dev/i2c-250 here: the panel is absent, the display carries on.
    display = open_display(driver="ssd1306", interface="i2c", i2c_port=250)
    try:
        assert display.flush(5)
        assert display.stats.connected is False
        assert display.stats.errors >= 1
    finally:
        display.close()
