"""Bus bytes per token over a 200-token story, through real luma init and the writer.

The target is at most 30 % of a full 1,024-byte frame per token on average, counting
command and data bytes after the panel is initialised.
"""

import pytest
from luma.oled.device import ssd1306

from appliance.display import open_display
from appliance.display.clock import ManualClock
from appliance.display.fakebus import FakeBus
from appliance.display.layout import Layout
from appliance.display.state import DisplayState

WAIT = 10.0
FULL_FRAME = 1024
WORDS = ("it was a cold night when the old clockmaker wound the crank of his strange box and "
         "watched the little screen as word after word appeared, slow and certain, telling him "
         "a story about the sea, the lighthouse, and the keeper who never slept").split()


def bytes_per_token(driver: str, tokens: int = 200) -> float:
    clock = ManualClock()
    display = open_display(driver=driver, interface="fake", clock=clock)
    try:
        display.flush(WAIT)
        start = display.bus.bytes_sent
        text = ""
        for index in range(tokens):
            text += ("" if not text else " ") + WORDS[index % len(WORDS)]
            clock.advance(0.4)
            display.update(DisplayState(text=text, tokens=index + 1, ctx_used=40 + index, n_ctx=2048,
                                        tokens_per_s=2.0 + (index % 5) / 10, ms_per_step=380 + index % 17))
            assert display.flush(WAIT)
            assert display.bus.image().tobytes() == display.last_image.tobytes()
        return (display.bus.bytes_sent - start) / tokens
    finally:
        display.close()


@pytest.mark.parametrize("driver", ["ssd1306", "sh1106"])
def test_bytes_per_token_within_budget(driver):
    assert bytes_per_token(driver) <= 0.30 * FULL_FRAME


def test_luma_full_frame_write_exceeds_budget():
    # What the writer saves against: luma's own display() sends every page.
    bus = FakeBus("ssd1306")
    device = ssd1306(bus)
    frame = Layout().render(DisplayState(text="one word", tokens=1))
    start = bus.bytes_sent
    device.display(frame)
    assert bus.bytes_sent - start > 0.30 * FULL_FRAME
