"""The page-diff writer: packing, minimal writes, SH1106 offset, pixels on the fake."""

import pytest
from luma.oled.device import sh1106, ssd1306
from PIL import Image, ImageDraw

from appliance.display.fakebus import FakeBus
from appliance.display.pagewriter import PAGE, WINDOW, PageWriter, pack_pages


class Recorder:
    """A serial interface that keeps every write."""

    def __init__(self):
        self.writes = []

    def command(self, *cmd):
        self.writes.append(("command", list(cmd)))

    def data(self, data):
        self.writes.append(("data", list(data)))

    def bytes(self):
        return sum(len(payload) for _, payload in self.writes)


def blank(size=(128, 64)):
    return Image.new("1", size)


def with_pixel(x, y, image=None):
    image = image or blank()
    image.putpixel((x, y), 255)
    return image


def writer_on(recorder, addressing=WINDOW, offset=0, width=128, pages=8):
    return PageWriter(recorder.command, recorder.data, width=width, pages=pages, column_offset=offset,
                      addressing=addressing)


def test_pack_puts_top_row_in_bit_0():
    pages = pack_pages(with_pixel(5, 8))
    assert pages[1][5] == 0x01


def test_pack_puts_bottom_row_in_bit_7():
    pages = pack_pages(with_pixel(127, 63))
    assert pages[7][127] == 0x80


def test_pack_shape():
    pages = pack_pages(blank())
    assert len(pages) == 8
    assert all(len(page) == 128 for page in pages)


def test_first_frame_is_full():
    recorder = Recorder()
    writer_on(recorder).write(pack_pages(blank()))
    assert recorder.writes == [("command", [0x21, 0, 127, 0x22, 0, 7]), ("data", [0] * 1024)]


def test_unchanged_frame_sends_nothing():
    recorder = Recorder()
    writer = writer_on(recorder)
    writer.write(pack_pages(blank()))
    recorder.writes.clear()
    assert writer.write(pack_pages(blank())) is False
    assert recorder.writes == []


def test_one_pixel_sends_one_byte_window():
    recorder = Recorder()
    writer = writer_on(recorder)
    writer.write(pack_pages(blank()))
    recorder.writes.clear()
    writer.write(pack_pages(with_pixel(10, 20)))
    assert recorder.writes == [("command", [0x21, 10, 10, 0x22, 2, 2]), ("data", [0x10])]


def test_window_adds_column_offset():
    recorder = Recorder()
    writer = writer_on(recorder, offset=32, width=64, pages=6)
    writer.write(pack_pages(blank((64, 48))))
    recorder.writes.clear()
    writer.write(pack_pages(with_pixel(0, 0, blank((64, 48)))))
    assert recorder.writes[0] == ("command", [0x21, 32, 32, 0x22, 0, 0])


def test_sh1106_page_command_includes_offset():
    recorder = Recorder()
    writer = writer_on(recorder, addressing=PAGE, offset=2)
    writer.write(pack_pages(blank()))
    recorder.writes.clear()
    writer.write(pack_pages(with_pixel(30, 40)))
    # Column 32 = 0x20: low nibble 0, high nibble 2.
    assert recorder.writes == [("command", [0xB5, 0x00, 0x12]), ("data", [0x01])]


def test_distant_changes_in_a_page_split_into_runs():
    recorder = Recorder()
    writer = writer_on(recorder, addressing=PAGE)
    writer.write(pack_pages(blank()))
    recorder.writes.clear()
    image = with_pixel(0, 0)
    image.putpixel((100, 0), 255)
    writer.write(pack_pages(image))
    assert [kind for kind, _ in recorder.writes] == ["command", "data", "command", "data"]


def test_adjacent_pages_share_a_window():
    recorder = Recorder()
    writer = writer_on(recorder)
    writer.write(pack_pages(blank()))
    recorder.writes.clear()
    image = blank()
    ImageDraw.Draw(image).rectangle((10, 0, 20, 15), fill=255)
    writer.write(pack_pages(image))
    assert recorder.writes[0] == ("command", [0x21, 10, 20, 0x22, 0, 1])


def test_far_apart_pages_get_separate_windows():
    recorder = Recorder()
    writer = writer_on(recorder)
    writer.write(pack_pages(blank()))
    recorder.writes.clear()
    image = with_pixel(0, 0)
    image.putpixel((0, 63), 255)
    writer.write(pack_pages(image))
    assert recorder.bytes() == 2 * (6 + 1)


def test_invalidate_forces_full_frame():
    recorder = Recorder()
    writer = writer_on(recorder)
    writer.write(pack_pages(blank()))
    writer.invalidate()
    recorder.writes.clear()
    writer.write(pack_pages(blank()))
    assert recorder.bytes() == 6 + 1024


def test_rejects_wrong_frame_size():
    writer = writer_on(Recorder())
    with pytest.raises(ValueError, match="pages"):
        writer.write(pack_pages(blank((128, 32))))


def test_rejects_unknown_addressing():
    with pytest.raises(ValueError, match="addressing"):
        writer_on(Recorder(), addressing="diagonal")


def frames():
    """A sequence of frames with small and large changes."""
    images = []
    image = blank()
    draw = ImageDraw.Draw(image)
    for step in range(12):
        draw.text((step * 9 % 120, step * 5 % 56), chr(65 + step), fill=255)
        images.append(image.copy())
    images.append(blank())
    images.append(Image.effect_noise((128, 64), 80).convert("1"))
    return images


@pytest.mark.parametrize("controller, device_class, addressing, offset", [
    ("ssd1306", ssd1306, WINDOW, 0),
    ("sh1106", sh1106, PAGE, 2),
])
def test_fake_matches_every_frame(controller, device_class, addressing, offset):
    bus = FakeBus(controller)
    device = device_class(bus)
    writer = PageWriter(device.command, device.data, width=128, pages=8, column_offset=offset,
                        addressing=addressing)
    for index, image in enumerate(frames()):
        writer.write(pack_pages(image))
        assert bus.image().tobytes() == image.tobytes(), f"frame {index}"


def test_sh1106_without_offset_is_shifted():
    bus = FakeBus("sh1106")
    device = sh1106(bus)
    writer = PageWriter(device.command, device.data, width=128, pages=8, column_offset=0, addressing=PAGE)
    image = with_pixel(10, 10)
    writer.write(pack_pages(image))
    assert bus.image().tobytes() != image.tobytes()
