"""CrankQueue: ordering, cancelling, grouping, backlog and accounting, without pins."""

import logging
import random
import threading
import time

import pytest

from appliance.crank.events import CrankQueue, Press, Rewind, Step
from appliance.crank.mockdrive import ManualClock
from appliance.errors import ConfigError
from crankpins import drain

CW, CCW = 1, -1


def put(queue, *directions):
    for direction in directions:
        queue.put_detent(direction)


def test_forward_detent_is_one_step():
    queue = CrankQueue()
    put(queue, CW, CW, CW)
    assert drain(queue) == [Step(1), Step(1), Step(1)]


def test_reverse_detent_is_one_rewind():
    queue = CrankQueue()
    put(queue, CCW, CCW)
    assert drain(queue) == [Rewind(1), Rewind(1)]


def test_reverse_cancels_pending_forward_first():
    queue = CrankQueue()
    put(queue, CW, CW, CW, CCW, CCW, CCW, CCW)
    assert drain(queue) == [Rewind(1)]


def test_reverse_cancel_counted_for_both_detents():
    queue = CrankQueue()
    put(queue, CW, CW, CW, CCW, CCW, CCW, CCW)
    drain(queue)
    counters = queue.counters()
    assert counters.cancelled == 6
    assert counters.rewound == 1
    assert counters.unaccounted() == 0


def test_forward_after_rewind_queues_behind_it():
    queue = CrankQueue()
    put(queue, CCW, CCW, CW)
    assert drain(queue) == [Rewind(1), Rewind(1), Step(1)]


def test_reverse_does_not_cancel_taken_steps():
    queue = CrankQueue()
    put(queue, CW, CW)
    assert drain(queue) == [Step(1), Step(1)]
    put(queue, CCW)
    assert drain(queue) == [Rewind(1)]


def test_press_delivered_after_earlier_detents():
    queue = CrankQueue()
    put(queue, CW, CW)
    queue.put_press(long=False)
    put(queue, CW)
    assert drain(queue) == [Step(1), Step(1), Press(long=False), Step(1)]


def test_reverse_does_not_cancel_across_press():
    queue = CrankQueue()
    put(queue, CW, CW)
    queue.put_press(long=True)
    put(queue, CCW)
    assert drain(queue) == [Step(1), Step(1), Press(long=True), Rewind(1)]


def test_put_event_delivered_in_order():
    queue = CrankQueue()
    queue.put_event("prompt from socket")
    put(queue, CW)
    queue.put_event({"command": "status"})
    assert drain(queue) == ["prompt from socket", Step(1), {"command": "status"}]


def test_put_event_rejects_none():
    queue = CrankQueue()
    with pytest.raises(ValueError):
        queue.put_event(None)


def test_detents_per_token_groups_detents():
    queue = CrankQueue(detents_per_token=3)
    put(queue, *[CW] * 7)
    assert drain(queue) == [Step(1), Step(1)]
    assert queue.counters().partial == 1


def test_detents_per_token_groups_rewinds():
    queue = CrankQueue(detents_per_token=3)
    put(queue, *[CCW] * 6)
    assert drain(queue) == [Rewind(1), Rewind(1)]


def test_partial_group_back_and_forth_is_nothing():
    queue = CrankQueue(detents_per_token=3)
    put(queue, CCW, CCW, CW, CW, CW, CW, CCW, CCW)
    assert drain(queue) == []
    counters = queue.counters()
    assert counters.cancelled == 8
    assert counters.partial == 0
    assert counters.unaccounted() == 0


def test_reverse_splits_pending_group():
    queue = CrankQueue(detents_per_token=3)
    put(queue, CW, CW, CW, CCW)
    assert drain(queue) == []
    assert queue.counters().partial == 2


def test_partial_group_carried_past_press():
    queue = CrankQueue(detents_per_token=3)
    put(queue, CW, CW)
    queue.put_press(long=False)
    put(queue, CW)
    assert drain(queue) == [Press(long=False), Step(1)]


def test_tokens_per_detent_makes_bursts():
    queue = CrankQueue(tokens_per_detent=4)
    put(queue, CW, CW, CCW, CCW, CCW)
    assert drain(queue) == [Rewind(4)]


def test_reverse_ignore_counts_and_drops():
    queue = CrankQueue(reverse="ignore")
    put(queue, CW, CCW, CCW)
    assert drain(queue) == [Step(1)]
    assert queue.counters().ignored == 2


def test_reverse_generate_steps_forward():
    queue = CrankQueue(reverse="generate")
    put(queue, CW, CCW, CCW)
    assert drain(queue) == [Step(1), Step(1), Step(1)]


def test_backlog_drops_above_cap():
    queue = CrankQueue(max_backlog=5)
    put(queue, *[CW] * 8)
    counters = queue.counters()
    assert counters.pending == 5
    assert counters.dropped == 3
    assert counters.backlog_peak == 5


def test_backlog_full_still_accepts_cancelling_reverse():
    queue = CrankQueue(max_backlog=2)
    put(queue, CW, CW, CW, CCW)
    assert drain(queue) == [Step(1)]
    assert queue.counters().dropped == 1


def test_drop_warning_rate_limited(caplog):
    clock = ManualClock()
    queue = CrankQueue(max_backlog=1, clock=clock)
    caplog.set_level(logging.WARNING, logger="appliance.crank.events")
    put(queue, *[CW] * 10)
    assert len(caplog.records) == 1
    clock.advance(11)
    put(queue, CW)
    assert len(caplog.records) == 2
    assert "dropped 9 detent(s), 10 in total" in caplog.records[1].getMessage()


def test_get_times_out_with_none():
    queue = CrankQueue()
    assert queue.get(timeout=0.01) is None


def test_get_waits_for_partial_group():
    queue = CrankQueue(detents_per_token=2)
    put(queue, CW)
    assert queue.get(timeout=0.01) is None


def test_close_wakes_blocked_get():
    queue = CrankQueue()
    results = []
    worker = threading.Thread(target=lambda: results.append(queue.get()))
    worker.start()
    queue.close()
    worker.join(timeout=10)
    assert not worker.is_alive()
    assert results == [None]


def test_get_wakes_on_detent_from_other_thread():
    queue = CrankQueue()
    results = []
    worker = threading.Thread(target=lambda: results.append(queue.get(timeout=10)))
    worker.start()
    queue.put_detent(CW)
    worker.join(timeout=10)
    assert results == [Step(1)]


def test_idle_get_uses_no_cpu():
    queue = CrankQueue()
    cpu = []

    def idle_worker():
        start = time.thread_time()
        queue.get(timeout=0.3)
        cpu.append(time.thread_time() - start)

    worker = threading.Thread(target=idle_worker)
    worker.start()
    worker.join(timeout=10)
    assert cpu[0] < 0.05


def test_puts_after_close_ignored():
    queue = CrankQueue()
    queue.close()
    put(queue, CW)
    queue.put_press(long=False)
    assert queue.counters().received == 0
    assert queue.get(timeout=0) is None


def test_invalid_direction_rejected():
    queue = CrankQueue()
    with pytest.raises(ValueError):
        queue.put_detent(2)


@pytest.mark.parametrize("kwargs", [
    {"max_backlog": 0},
    {"detents_per_token": 0},
    {"tokens_per_detent": 1.5},
    {"detents_per_token": 2, "tokens_per_detent": 2},
    {"reverse": "backwards"},
    {"max_backlog": True},
])
def test_invalid_settings_rejected(kwargs):
    with pytest.raises(ConfigError):
        CrankQueue(**kwargs)


@pytest.mark.parametrize("settings", [
    {},
    {"detents_per_token": 3},
    {"tokens_per_detent": 4},
    {"reverse": "ignore"},
    {"reverse": "generate"},
    {"max_backlog": 4, "detents_per_token": 2},
])
def test_accounting_balances_random_crank(settings):
    rng = random.Random(20240511)
    queue = CrankQueue(**settings)
    for _ in range(5000):
        roll = rng.random()
        if roll < 0.45:
            queue.put_detent(CW)
        elif roll < 0.8:
            queue.put_detent(CCW)
        elif roll < 0.82:
            queue.put_press(long=rng.random() < 0.5)
        else:
            queue.get(timeout=0)
        assert queue.counters().unaccounted() == 0
    drain(queue)
    counters = queue.counters()
    assert counters.unaccounted() == 0
    assert counters.pending == 0
