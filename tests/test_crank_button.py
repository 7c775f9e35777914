"""Push button: short and long press, debounce, on MockFactory pins with a manual clock."""

import pytest

from appliance.crank.button import CrankButton
from appliance.crank.events import CrankQueue, Press
from appliance.crank.mockdrive import ManualClock
from appliance.crank.source import open_crank
from appliance.errors import ConfigError
from crankpins import PINS, drain

@pytest.fixture
def open_mock_crank(factory):
    opened = []

    def open_(clock="manual", **settings):
        # clock=None selects the real clock: the driver then holds for real time.
        queue = CrankQueue()
        clock = ManualClock() if clock == "manual" else clock
        crank = open_crank(queue=queue, factory=factory, clock=clock, **PINS, **settings)
        opened.append((crank, queue))
        return crank, queue

    yield open_
    for crank, queue in opened:
        queue.close()
        crank.close()


def test_short_press(open_mock_crank):
    crank, queue = open_mock_crank()
    crank.driver.press()
    assert drain(queue) == [Press(long=False)]


def test_long_press(open_mock_crank):
    crank, queue = open_mock_crank()
    crank.driver.long_press()
    assert drain(queue) == [Press(long=True)]


def test_press_reported_on_release(open_mock_crank, factory):
    crank, queue = open_mock_crank()
    factory.pin("GPIO27").drive_low()
    assert drain(queue) == []


def test_bouncing_short_press_counts_once(open_mock_crank):
    crank, queue = open_mock_crank()
    crank.driver.press(bounces=4)
    assert drain(queue) == [Press(long=False)]


def test_bouncing_long_press_counts_once(open_mock_crank):
    crank, queue = open_mock_crank()
    crank.driver.long_press(bounces=4)
    assert drain(queue) == [Press(long=True)]


def test_presses_in_a_row(open_mock_crank):
    crank, queue = open_mock_crank()
    crank.driver.press(bounces=2)
    crank.driver.long_press(bounces=2)
    crank.driver.press(bounces=2)
    assert drain(queue) == [Press(long=False), Press(long=True), Press(long=False)]


@pytest.mark.parametrize("hold, long", [(0.4, False), (0.6, True)])
def test_long_press_threshold_configurable(open_mock_crank, hold, long):
    crank, queue = open_mock_crank(long_press=0.5)
    crank.driver.press(hold=hold)
    assert drain(queue) == [Press(long=long)]


def test_glitch_shorter_than_bounce_ignored(open_mock_crank, factory):
    clock = ManualClock()
    crank, queue = open_mock_crank(clock=clock)
    button = factory.pin("GPIO27")
    button.drive_low()
    clock.advance(0.005)
    button.drive_high()
    clock.advance(5.0)
    assert drain(queue) == []
    crank.driver.press()
    assert drain(queue) == [Press(long=False)]


def test_pull_down_button(open_mock_crank):
    crank, queue = open_mock_crank(pull_up=False)
    crank.driver.press(bounces=2)
    assert drain(queue) == [Press(long=False)]


def test_button_held_at_start_ignored(factory):
    factory.pin("GPIO27").drive_low()
    presses = []
    clock = ManualClock()
    button = CrankButton("GPIO27", factory=factory, on_press=presses.append, clock=clock)
    try:
        factory.pin("GPIO27").drive_high()
        assert presses == []
    finally:
        button.close()


def test_real_clock_short_press(open_mock_crank):
    crank, queue = open_mock_crank(clock=None)
    crank.driver.press()
    assert drain(queue) == [Press(long=False)]


def test_no_button_pin(factory):
    queue = CrankQueue()
    crank = open_crank(queue=queue, factory=factory, pin_a="GPIO17", pin_b="GPIO18")
    try:
        assert crank.button is None
        with pytest.raises(RuntimeError):
            crank.driver.press()
    finally:
        crank.close()


@pytest.mark.parametrize("settings", [
    {"long_press": 0},
    {"long_press": -1.0},
    {"button_bounce": -0.01},
    {"button_bounce": 2.0},
])
def test_invalid_button_settings(factory, settings):
    with pytest.raises(ConfigError):
        open_crank(queue=CrankQueue(), factory=factory, **PINS, **settings)
