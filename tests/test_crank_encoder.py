"""Encoder decoding through gpiozero MockFactory pins driven with real quadrature sequences."""

import threading

import pytest

from appliance.crank.events import CrankQueue, Rewind, Step
from appliance.crank.mockdrive import ManualClock, QuadratureDriver
from appliance.crank.source import open_crank
from crankpins import PINS, drain

QUEUE_SETTINGS = ("max_backlog", "detents_per_token", "tokens_per_detent", "reverse")


@pytest.fixture
def open_mock_crank(factory):
    opened = []

    def open_(**settings):
        queue = CrankQueue(**{key: settings.pop(key) for key in QUEUE_SETTINGS if key in settings})
        crank = open_crank(queue=queue, factory=factory, clock=ManualClock(), **PINS, **settings)
        opened.append((crank, queue))
        return crank, queue

    yield open_
    for crank, queue in opened:
        queue.close()
        crank.close()


@pytest.mark.parametrize("transitions", [4, 2])
def test_clockwise_detents_make_steps(open_mock_crank, transitions):
    crank, queue = open_mock_crank(transitions_per_detent=transitions)
    crank.driver.turn_cw(7)
    assert drain(queue) == [Step(1)] * 7


@pytest.mark.parametrize("transitions", [4, 2])
def test_counter_clockwise_detents_rewind(open_mock_crank, transitions):
    crank, queue = open_mock_crank(transitions_per_detent=transitions)
    crank.driver.turn_ccw(3)
    assert drain(queue) == [Rewind(1)] * 3


@pytest.mark.parametrize("transitions", [4, 2])
def test_pull_down_wiring_counts_detents(open_mock_crank, transitions):
    crank, queue = open_mock_crank(transitions_per_detent=transitions, pull_up=False)
    crank.driver.turn_cw(5)
    crank.driver.turn_ccw(1)
    assert drain(queue) == [Step(1)] * 4


@pytest.mark.parametrize("transitions", [4, 2])
@pytest.mark.parametrize("pin", ["a", "b"])
def test_bounce_makes_no_step(open_mock_crank, transitions, pin):
    crank, queue = open_mock_crank(transitions_per_detent=transitions)
    crank.driver.bounce(pin=pin, times=5)
    assert drain(queue) == []
    assert queue.counters().received == 0


@pytest.mark.parametrize("transitions", [4, 2])
def test_jiggle_makes_no_step(open_mock_crank, transitions):
    crank, queue = open_mock_crank(transitions_per_detent=transitions)
    crank.driver.jiggle()
    assert drain(queue) == []
    assert queue.counters().received == 0


@pytest.mark.parametrize("transitions", [4, 2])
def test_half_detent_and_back_makes_nothing(open_mock_crank, transitions):
    crank, queue = open_mock_crank(transitions_per_detent=transitions)
    crank.driver.half_detent_and_back()
    assert drain(queue) == []
    assert queue.counters().received == 0


@pytest.mark.parametrize("transitions", [4, 2])
def test_bounce_between_detents_still_counts_once(open_mock_crank, transitions):
    crank, queue = open_mock_crank(transitions_per_detent=transitions)
    crank.driver.turn_cw(1)
    crank.driver.bounce(pin="a", times=3)
    crank.driver.jiggle()
    crank.driver.turn_cw(1)
    assert drain(queue) == [Step(1)] * 2


def test_half_cycle_encoder_read_as_full_cycle_skips_clicks(open_mock_crank, factory):
    crank, queue = open_mock_crank(transitions_per_detent=4)
    half_cycle = QuadratureDriver(factory, "GPIO17", "GPIO18", "GPIO27", transitions_per_detent=2)
    half_cycle.turn_cw(6)
    assert len(drain(queue)) == 3


def test_count_not_capped_by_max_steps(open_mock_crank):
    crank, queue = open_mock_crank()
    crank.driver.turn_cw(40)
    assert len(drain(queue)) == 40


@pytest.mark.parametrize("settings, kind", [
    ({"transitions_per_detent": 4}, "gpiozero"),
    ({"transitions_per_detent": 2}, "state-table"),
    ({"transitions_per_detent": 4, "pull_up": False}, "state-table"),
])
def test_decoder_choice(open_mock_crank, settings, kind):
    crank, _queue = open_mock_crank(**settings)
    assert crank.encoder.kind == kind


@pytest.mark.parametrize("transitions", [4, 2])
def test_invert_reverses_raw_wiring(open_mock_crank, factory, transitions):
    crank, queue = open_mock_crank(transitions_per_detent=transitions, invert=True)
    raw = QuadratureDriver(factory, "GPIO17", "GPIO18", "GPIO27", transitions_per_detent=transitions)
    raw.turn_cw(2)
    assert drain(queue) == [Rewind(1)] * 2


@pytest.mark.parametrize("transitions", [4, 2])
def test_invert_driver_turns_clockwise(open_mock_crank, transitions):
    crank, queue = open_mock_crank(transitions_per_detent=transitions, invert=True)
    crank.driver.turn_cw(2)
    assert drain(queue) == [Step(1)] * 2


def test_reversal_cancels_pending_then_rewinds(open_mock_crank):
    crank, queue = open_mock_crank()
    crank.driver.turn_cw(5)
    crank.driver.turn_ccw(7)
    assert drain(queue) == [Rewind(1)] * 2
    counters = queue.counters()
    assert counters.cancelled == 10
    assert counters.rewound == 2


def test_reversal_after_steps_taken_rewinds(open_mock_crank):
    crank, queue = open_mock_crank()
    crank.driver.turn_cw(2)
    assert drain(queue) == [Step(1)] * 2
    crank.driver.turn_ccw(1)
    assert drain(queue) == [Rewind(1)]


def test_detents_per_token_three(open_mock_crank):
    crank, queue = open_mock_crank(detents_per_token=3)
    crank.driver.turn_cw(7)
    assert drain(queue) == [Step(1)] * 2
    assert queue.counters().partial == 1


def test_tokens_per_detent_four(open_mock_crank):
    crank, queue = open_mock_crank(tokens_per_detent=4)
    crank.driver.turn_cw(2)
    assert drain(queue) == [Step(4)] * 2


def test_reverse_ignore(open_mock_crank):
    crank, queue = open_mock_crank(reverse="ignore")
    crank.driver.turn_ccw(3)
    assert drain(queue) == []
    assert queue.counters().ignored == 3


def test_reverse_generate(open_mock_crank):
    crank, queue = open_mock_crank(reverse="generate")
    crank.driver.turn_ccw(3)
    assert drain(queue) == [Step(1)] * 3


def run_slow_worker(queue, busy, consumed_all, expected):
    # Busy with a long decode until the test sets ``busy``; then takes steps as fast
    # as it can and reports when it has taken ``expected`` of them.
    steps = 0
    busy.wait(timeout=30)
    while (item := queue.get()) is not None:
        if isinstance(item, Step):
            steps += 1
        if steps == expected:
            consumed_all.set()


@pytest.mark.parametrize("detents, dropped", [(1000, 936), (64, 0)])
def test_burst_with_slow_worker_accounts_exactly(open_mock_crank, detents, dropped):
    crank, queue = open_mock_crank(max_backlog=64)
    busy, consumed_all = threading.Event(), threading.Event()
    worker = threading.Thread(
        target=run_slow_worker, args=(queue, busy, consumed_all, detents - dropped)
    )
    worker.start()

    crank.driver.turn_cw(detents)
    during_burst = queue.counters()
    busy.set()
    assert consumed_all.wait(timeout=30)
    queue.close()
    worker.join(timeout=30)

    assert during_burst.pending == 64
    assert during_burst.dropped == dropped
    counters = queue.counters()
    assert counters.received == detents
    assert counters.generated == detents - dropped
    assert counters.dropped == dropped
    assert counters.backlog_peak == 64
    assert counters.unaccounted() == 0
