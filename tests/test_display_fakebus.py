"""The fake controller: command decoding, RAM addressing, faults, luma devices on it."""

import errno

import pytest
from luma.core.error import DeviceNotFoundError
from luma.oled.device import sh1106, sh1107, ssd1306, ssd1309
from PIL import Image, ImageDraw

from appliance.display.fakebus import FakeBus


def same_pixels(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and a.convert("1").tobytes() == b.convert("1").tobytes()


def picture(size=(128, 64)):
    image = Image.new("1", size)
    draw = ImageDraw.Draw(image)
    draw.rectangle((3, 5, 40, 30), outline=255)
    draw.line((0, size[1] - 1, size[0] - 1, 0), fill=255)
    draw.text((50, 10), "crank", fill=255)
    return image


def test_horizontal_mode_fills_window():
    bus = FakeBus("ssd1306")
    bus.command(0x20, 0x00, 0x21, 10, 11, 0x22, 2, 3)
    bus.data([0x01, 0x02, 0x03, 0x04])
    image = bus.image()
    assert image.getpixel((10, 16))
    assert image.getpixel((11, 17))
    assert image.getpixel((10, 24))
    assert image.getpixel((11, 26))


def test_horizontal_mode_wraps_to_window_start():
    bus = FakeBus("ssd1306")
    bus.command(0x20, 0x00, 0x21, 0, 1, 0x22, 0, 0)
    bus.data([0xFF, 0xFF, 0x80])
    assert bus.column == 1
    assert bus.page == 0


def test_page_mode_sets_column_from_nibbles():
    bus = FakeBus("ssd1306")
    bus.command(0x20, 0x02, 0xB3, 0x05, 0x14)
    bus.data([0xFF])
    assert bus.image().getpixel((0x45, 24))


def test_sh1106_panel_starts_at_column_2():
    bus = FakeBus("sh1106")
    bus.command(0xB0, 0x02, 0x10)
    bus.data([0x01])
    assert bus.image().getpixel((0, 0))


def test_sh1106_column_0_is_off_panel():
    bus = FakeBus("sh1106")
    bus.command(0xB0, 0x00, 0x10)
    bus.data([0x00, 0x00])
    assert not bus.image().getpixel((0, 0))


def test_sh1106_ignores_window_commands():
    bus = FakeBus("sh1106")
    bus.command(0x21)
    assert bus.unknown_commands == [0x21]


def test_sh1106_write_past_ram_counts_overrun():
    bus = FakeBus("sh1106")
    bus.command(0xB0, 0x03, 0x18)
    bus.data([0xFF] * 4)
    assert bus.overruns == 3


def test_contrast_and_power_commands():
    bus = FakeBus("ssd1306")
    bus.command(0x81, 0x20, 0xAF)
    assert bus.contrast == 0x20
    assert bus.is_on


def test_display_off_command():
    bus = FakeBus("ssd1306")
    bus.command(0xAF, 0xAE)
    assert not bus.is_on


def test_start_line_shifts_rows():
    bus = FakeBus("ssd1306")
    bus.command(0x20, 0x02, 0xB1, 0x00, 0x10)
    bus.data([0x01])
    bus.command(0x48)
    assert bus.image().getpixel((0, 0))


def test_arguments_may_span_calls():
    bus = FakeBus("ssd1306")
    bus.command(0x81)
    bus.command(0x33)
    assert bus.contrast == 0x33


def test_counts_bytes():
    bus = FakeBus("ssd1306")
    bus.command(0xAE, 0xAF)
    bus.data([1, 2, 3])
    assert bus.command_bytes == 2
    assert bus.data_bytes == 3
    assert bus.bytes_sent == 5


def test_command_fault_raises_luma_error():
    bus = FakeBus("ssd1306")
    bus.fail_next_command()
    with pytest.raises(DeviceNotFoundError):
        bus.command(0xAF)


def test_data_fault_raises_errno_121():
    bus = FakeBus("ssd1306")
    bus.fail_next_data()
    with pytest.raises(OSError) as failure:
        bus.data([0])
    assert failure.value.errno == errno.EREMOTEIO


def test_fault_is_one_shot():
    bus = FakeBus("ssd1306")
    bus.fail_next_command()
    with pytest.raises(DeviceNotFoundError):
        bus.command(0xAF)
    bus.command(0xAF)
    assert bus.is_on


def test_unplugged_bus_fails_until_plugged():
    bus = FakeBus("ssd1306")
    bus.unplug()
    with pytest.raises(DeviceNotFoundError):
        bus.command(0xAF)
    bus.plug()
    bus.command(0xAF)
    assert bus.is_on


def test_plug_powers_up_with_random_ram():
    bus = FakeBus("ssd1306")
    bus.unplug()
    bus.plug()
    assert bus.image().getbbox() is not None


def test_absent_address_fails_like_luma():
    with pytest.raises(DeviceNotFoundError):
        FakeBus("ssd1306", address=0x3D).at(0x3C).command(0xAE)


def test_present_address_is_the_bus():
    bus = FakeBus("ssd1306", address=0x3D)
    assert bus.at(0x3D) is bus


def test_unknown_controller():
    with pytest.raises(ValueError, match="unknown"):
        FakeBus("ssd9999")


@pytest.mark.parametrize("device_class", [ssd1306, ssd1309])
def test_luma_ssd1306_class_frame(device_class):
    bus = FakeBus("ssd1306")
    device = device_class(bus)
    image = picture()
    device.display(image)
    assert same_pixels(bus.image(), image)


def test_luma_ssd1306_init_leaves_panel_on():
    bus = FakeBus("ssd1306")
    ssd1306(bus)
    assert bus.is_on
    assert bus.unknown_commands == []


def test_luma_ssd1306_64x48_uses_middle_columns():
    bus = FakeBus("ssd1306", 64, 48)
    device = ssd1306(bus, width=64, height=48)
    image = picture((64, 48))
    device.display(image)
    assert same_pixels(bus.image(), image)


def test_luma_sh1106_frame():
    bus = FakeBus("sh1106")
    device = sh1106(bus)
    image = picture()
    device.display(image)
    assert same_pixels(bus.image(), image)


def test_luma_sh1106_init_clears_panel():
    bus = FakeBus("sh1106")
    sh1106(bus)
    assert bus.image().getbbox() is None


def test_luma_sh1107_frame():
    bus = FakeBus("sh1107", 64, 128)
    device = sh1107(bus, width=64, height=128)
    image = picture((64, 128))
    device.display(image)
    assert same_pixels(bus.image(), image)
