"""The render thread: latest-wins updates, pacing, idle, faults and reconnects, close.

Time is a ManualClock: ``clock.advance`` moves it and ``display.wait_idle`` waits
until the thread has done what fell due, so no test sleeps.
"""

import threading

import pytest
from luma.core.error import DeviceNotFoundError

from appliance.display import open_display
from appliance.display.clock import ManualClock, SystemClock
from appliance.display.fakebus import FakeBus
from appliance.display.layout import Layout
from appliance.display.render import Backoff
from appliance.display.state import DisplayState

WAIT = 10.0  # real seconds a test waits for the thread before failing


def state(text="hello", tokens=1, **fields):
    return DisplayState(text=text, tokens=tokens, **fields)


def shows(bus: FakeBus, image) -> bool:
    return bus.image().tobytes() == image.tobytes()


@pytest.fixture
def clock():
    return ManualClock()


@pytest.fixture
def opened(clock):
    """Open displays on fake buses and close them after the test."""
    displays = []

    def open_(**settings):
        settings.setdefault("driver", "ssd1306")
        settings.setdefault("interface", "fake")
        display = open_display(clock=clock, **settings)
        displays.append(display)
        assert display.wait_idle(WAIT)
        return display

    yield open_
    for display in displays:
        display.close()


class GatedBus(FakeBus):
    """A FakeBus whose data writes block until ``gate`` is set, once armed."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.armed = False
        self.entered = threading.Event()
        self.gate = threading.Event()

    def data(self, data):
        if self.armed:
            self.entered.set()
            assert self.gate.wait(WAIT), "test never opened the gate"
        super().data(data)


# -- drawing ---------------------------------------------------------------------

def test_update_draws_layout_frame(opened):
    display = opened()
    display.update(state())
    assert display.flush(WAIT)
    assert shows(display.bus, Layout().render(state()))


def test_update_returns_while_bus_blocks(opened):
    bus = GatedBus()
    display = opened(bus=bus)
    bus.armed = True
    display.update(state("first"))
    assert bus.entered.wait(WAIT)
    display.update(state("second", 2))
    assert not bus.gate.is_set()
    bus.gate.set()
    assert display.flush(WAIT)


def test_latest_state_wins(opened):
    bus = GatedBus()
    display = opened(bus=bus)
    bus.armed = True
    display.update(state("one", 1))
    assert bus.entered.wait(WAIT)
    for tokens, text in ((2, "two"), (3, "three"), (4, "four")):
        display.update(state(text, tokens))
    bus.gate.set()
    assert display.flush(WAIT)
    assert shows(bus, Layout().render(state("four", 4)))
    assert display.stats.frames_sent == 2
    assert display.stats.states_dropped == 2


def test_unchanged_frame_is_not_sent(opened):
    display = opened()
    display.update(state())
    display.flush(WAIT)
    sent = display.bus.bytes_sent
    display.update(state())
    display.flush(WAIT)
    assert display.bus.bytes_sent == sent
    assert display.stats.frames_skipped == 1


def test_frame_rate_is_capped(opened, clock):
    display = opened(fps_max=10)
    display.update(state("a", 1))
    assert display.wait_idle(WAIT)
    display.update(state("b", 2))
    assert display.wait_idle(WAIT)
    assert display.stats.frames_sent == 1
    clock.advance(0.1)
    assert display.wait_idle(WAIT)
    assert display.stats.frames_sent == 2


def test_flush_skips_the_frame_gap(opened):
    display = opened(fps_max=1)
    display.update(state("a", 1))
    display.update(state("b", 2))
    assert display.flush(WAIT)
    assert shows(display.bus, Layout().render(state("b", 2)))


def test_last_image_is_frame_sent(opened):
    display = opened()
    display.update(state("x", 3))
    display.flush(WAIT)
    assert display.last_image.tobytes() == Layout().render(state("x", 3)).tobytes()


def test_update_rejects_other_types(opened):
    display = opened()
    with pytest.raises(TypeError):
        display.update("text")


# -- idle ------------------------------------------------------------------------

def test_contrast_setting_applied(opened):
    display = opened(contrast=200)
    assert display.bus.contrast == 200


def test_idle_dims(opened, clock):
    display = opened(dim_after=60, dim_contrast=16, off_after=600)
    clock.advance(60)
    assert display.wait_idle(WAIT)
    assert display.bus.contrast == 16
    assert display.bus.is_on


def test_idle_switches_off(opened, clock):
    display = opened(dim_after=60, off_after=600)
    clock.advance(600)
    assert display.wait_idle(WAIT)
    assert not display.bus.is_on


def test_not_dimmed_before_deadline(opened, clock):
    display = opened(dim_after=60, contrast=255)
    clock.advance(59.9)
    assert display.wait_idle(WAIT)
    assert display.bus.contrast == 255


def test_activity_wakes_panel(opened, clock):
    display = opened(dim_after=60, off_after=600, contrast=255)
    clock.advance(600)
    display.wait_idle(WAIT)
    display.activity()
    assert display.wait_idle(WAIT)
    assert display.bus.is_on
    assert display.bus.contrast == 255


def test_new_token_wakes_panel(opened, clock):
    display = opened(dim_after=60, off_after=600)
    clock.advance(600)
    display.wait_idle(WAIT)
    display.update(state("more", 2))
    assert display.wait_idle(WAIT)
    assert display.bus.is_on


def test_rate_change_does_not_wake(opened, clock):
    display = opened(dim_after=60, off_after=600)
    display.update(state(tokens_per_s=2.0))
    display.flush(WAIT)
    clock.advance(600)
    display.wait_idle(WAIT)
    display.update(state(tokens_per_s=0.0))
    assert display.wait_idle(WAIT)
    assert not display.bus.is_on


def test_zero_delays_never_dim(opened, clock):
    display = opened(dim_after=0, off_after=0, contrast=255)
    clock.advance(10_000)
    assert display.wait_idle(WAIT)
    assert display.bus.contrast == 255
    assert display.bus.is_on


class RecordingClock(SystemClock):
    """The system clock, noting the timeout of every wait."""

    def __init__(self):
        super().__init__()
        self.timeouts = []

    def wait(self, condition, timeout):
        self.timeouts.append(timeout)
        super().wait(condition, timeout)


def test_idle_thread_waits_without_timeout():
    clock = RecordingClock()
    display = open_display(driver="dummy", clock=clock, dim_after=0, off_after=0)
    try:
        display.update(state())
        display.flush(WAIT)
        assert display.wait_idle(WAIT)
        assert clock.timeouts[-1] is None
    finally:
        display.close()


def test_idle_thread_sleeps_until_dim_deadline():
    clock = RecordingClock()
    display = open_display(driver="dummy", clock=clock, dim_after=60, off_after=600)
    try:
        assert display.wait_idle(WAIT)
        assert 50 < clock.timeouts[-1] <= 60
    finally:
        display.close()


# -- faults ----------------------------------------------------------------------

def test_absent_at_start_keeps_accepting_updates(opened):
    bus = FakeBus()
    bus.unplug()
    display = opened(bus=bus)
    display.update(state("still going", 5))
    assert display.flush(WAIT)
    assert display.stats.connected is False
    assert display.stats.errors == 1


def test_absent_at_start_reconnects_and_draws(opened, clock):
    bus = FakeBus()
    bus.unplug()
    display = opened(bus=bus)
    display.update(state("drawn later", 5))
    display.flush(WAIT)
    bus.plug()
    clock.advance(1.0)
    assert display.wait_idle(WAIT)
    assert display.stats.connected
    assert display.stats.reconnects == 1
    assert shows(bus, Layout().render(state("drawn later", 5)))


def test_retry_backoff_doubles_to_30s(opened, clock):
    bus = FakeBus()
    bus.unplug()
    display = opened(bus=bus)
    attempts_at = []
    for _ in range(80):
        clock.advance(1.0)
        errors = display.stats.errors
        display.wait_idle(WAIT)
        if display.stats.errors > errors:
            attempts_at.append(clock.now())
    gaps = [later - earlier for earlier, later in zip([0.0] + attempts_at, attempts_at)]
    assert gaps == [1, 2, 4, 8, 16, 30][:len(gaps)]
    assert len(gaps) == 6


@pytest.mark.parametrize("fault", ["command", "data"])
def test_fault_at_start_recovers(opened, clock, fault):
    bus = FakeBus()
    getattr(bus, f"fail_next_{fault}")()
    display = opened(bus=bus)
    assert display.stats.errors == 1
    clock.advance(1.0)
    assert display.wait_idle(WAIT)
    assert display.stats.connected
    assert display.stats.reconnects == 1


@pytest.mark.parametrize("fault", ["command", "data"])
def test_fault_mid_story_keeps_updating(opened, fault):
    display = opened()
    display.update(state("before", 1))
    display.flush(WAIT)
    getattr(display.bus, f"fail_next_{fault}")()
    display.update(state("during", 2))
    assert display.flush(WAIT)
    display.update(state("after", 3))
    assert display.flush(WAIT)
    assert display.stats.errors == 1
    assert display.stats.connected is False


@pytest.mark.parametrize("fault", ["command", "data"])
def test_fault_mid_story_reinitialises(opened, clock, fault):
    display = opened()
    display.update(state("before", 1))
    display.flush(WAIT)
    inits = display.bus.inits
    getattr(display.bus, f"fail_next_{fault}")()
    display.update(state("during", 2))
    display.flush(WAIT)
    clock.advance(1.0)
    assert display.wait_idle(WAIT)
    assert display.bus.inits == inits + 1
    assert display.stats.reconnects == 1


@pytest.mark.parametrize("fault", ["command", "data"])
def test_fault_mid_story_redraws_full_frame(opened, clock, fault):
    display = opened()
    display.update(state("before", 1))
    display.flush(WAIT)
    getattr(display.bus, f"fail_next_{fault}")()
    display.update(state("during", 2))
    display.flush(WAIT)
    data_before = display.bus.data_bytes
    clock.advance(1.0)
    display.wait_idle(WAIT)
    # luma's init clears RAM with one full frame, then the writer sends a whole frame.
    assert display.bus.data_bytes - data_before == 2 * 1024
    assert shows(display.bus, Layout().render(state("during", 2)))


def test_unplug_mid_story_then_replug(opened, clock):
    display = opened()
    display.update(state("one", 1))
    display.flush(WAIT)
    display.bus.unplug()
    display.update(state("two", 2))
    display.flush(WAIT)
    display.update(state("three", 3))
    display.flush(WAIT)
    display.bus.plug()
    clock.advance(1.0)
    assert display.wait_idle(WAIT)
    assert shows(display.bus, Layout().render(state("three", 3)))


def test_reconnect_restores_idle_level(opened, clock):
    display = opened(dim_after=60, off_after=0, dim_contrast=16)
    display.bus.unplug()
    display.update(state("two", 2))
    display.flush(WAIT)
    display.bus.plug()
    clock.advance(61.0)
    assert display.wait_idle(WAIT)
    assert display.stats.connected
    assert display.bus.contrast == 16


class ExplodingPanelBus(FakeBus):
    """A bus whose data writes raise an error no reconnect can cure."""

    def data(self, data):
        raise RuntimeError("driver bug")


def test_unexpected_panel_error_disables_display(opened):
    display = opened(bus=ExplodingPanelBus())
    display.update(state())
    assert display.flush(WAIT)
    assert display.stats.connected is False
    assert display.stats.errors == 1


def test_backoff_rejects_bad_range():
    with pytest.raises(ValueError):
        Backoff(first=5, maximum=1)


# -- close -----------------------------------------------------------------------

def test_close_blanks_and_switches_off(clock):
    display = open_display(driver="ssd1306", interface="fake", clock=clock)
    display.update(state())
    display.flush(WAIT)
    display.close()
    assert display.bus.image().getbbox() is None
    assert not display.bus.is_on


def test_close_with_persist_keeps_last_text(clock):
    display = open_display(driver="ssd1306", interface="fake", clock=clock, persist=True)
    display.update(state("keep me", 4))
    display.close()
    assert shows(display.bus, Layout().render(state("keep me", 4)))
    assert display.bus.is_on


def test_close_with_persist_wakes_panel(clock):
    display = open_display(driver="ssd1306", interface="fake", clock=clock, persist=True, off_after=10)
    display.update(state())
    display.flush(WAIT)
    clock.advance(10)
    display.wait_idle(WAIT)
    display.close()
    assert display.bus.is_on


def test_close_releases_bus(clock):
    display = open_display(driver="ssd1306", interface="fake", clock=clock)
    display.close()
    assert display.bus.closed


def test_close_while_absent(clock):
    bus = FakeBus()
    bus.unplug()
    display = open_display(driver="ssd1306", interface="fake", clock=clock, bus=bus)
    display.wait_idle(WAIT)
    display.close()
    assert display.stats.connected is False


def test_update_after_close_is_ignored(clock):
    display = open_display(driver="dummy", clock=clock)
    display.close()
    display.update(state())
    assert display.stats.frames_sent == 0


def test_close_twice(clock):
    display = open_display(driver="dummy", clock=clock)
    display.close()
    display.close()
    assert display.stats.frames_sent == 0


def test_fake_bus_error_type_is_luma_error():
    bus = FakeBus()
    bus.unplug()
    with pytest.raises(DeviceNotFoundError):
        bus.command(0xAE)
