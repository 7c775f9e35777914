"""Benchmark phases that run the real daemon inside this process, next to the bare reference.

``Rig`` assembles the appliance from the benchmark's config with a MockFactory whose
pins a QuadratureDriver turns, exactly as `crankllm simulate --script` does. A detent
therefore travels the whole path: pin edges, the encoder's decoder, the CrankQueue,
the worker's engine step, the display state and render thread, the fake SSD1306 bus,
and the transcript file.

Each phase returns plain numbers; figures.py turns them into figures with goals.
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import threading
import time

from gpiozero.pins.mock import MockFactory

from appliance.bench import procfs
from appliance.bench.bare import BareLlama
from appliance.bench.errors import BenchError
from appliance.bench.plan import Plan
from appliance.engine.engine import Engine
from appliance.service.daemon import NewStory, engine_settings
from appliance.service.notify import Notifier
from appliance.service.runner import assemble

log = logging.getLogger(__name__)

# Maximum real wait for one daemon event or display flush before the phase fails.
SYNC_TIMEOUT_S = 300.0
# Crank speed of the fast-crank display run: 60 rpm on a 20-detent encoder (a KY-040),
# the simulator's default pace.
FAST_CRANK_DETENTS_PER_S = 20.0

# Loggers of the parts the rig runs. Each new story logs at INFO, which would bury the
# benchmark's own progress lines, so they are raised to WARNING while a rig is open.
_DAEMON_LOGGERS = ("appliance.service", "appliance.display", "appliance.crank", "appliance.engine",
                   "appliance.llama_cpp")


@contextlib.contextmanager
def quiet_daemon_logs():
    """Raise the daemon's loggers to WARNING for the block, then restore their levels."""
    loggers = [logging.getLogger(name) for name in _DAEMON_LOGGERS]
    saved = [logger.level for logger in loggers]
    for logger in loggers:
        if logger.getEffectiveLevel() < logging.WARNING:
            logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, saved):
            logger.setLevel(level)


class Rig:
    """The appliance assembled in this process, with a mock crank to turn."""

    def __init__(self, config):
        self.config = config
        # An empty environment: a benchmark started by systemd must not report READY for it.
        self.appliance = assemble(config, pin_factory=MockFactory(), notifier=Notifier(env={}))
        self.daemon = self.appliance.daemon
        self.queue = self.appliance.queue
        self.display = self.appliance.display
        self.driver = self.appliance.crank.driver
        self.frame_gap = 1.0 / config.display.fps_max

    def close(self) -> None:
        self.daemon.stop()
        self.daemon.join(SYNC_TIMEOUT_S)
        self.appliance.close()

    def sync(self) -> None:
        if not self.daemon.sync(SYNC_TIMEOUT_S):
            raise BenchError(f"the daemon did not finish its queued events within {SYNC_TIMEOUT_S:.0f} s")

    def flush(self) -> None:
        if not self.display.flush(SYNC_TIMEOUT_S):
            raise BenchError(f"the display did not draw its latest state within {SYNC_TIMEOUT_S:.0f} s")

    def settle(self) -> None:
        """Wait until the render thread has drawn what is due, the frame-rate gap included."""
        time.sleep(self.frame_gap * 1.5)
        self.display.wait_idle(SYNC_TIMEOUT_S)

    def new_story(self) -> None:
        """Re-prime the prompt, as a long press does, and wait until the panel shows it."""
        self.daemon.post(NewStory())
        self.sync()
        self.flush()
        self.settle()

    def crank_lockstep(self, detents: int, *, flush: bool = False) -> None:
        """Turn ``detents`` detents, each one after the previous one's step has finished."""
        for _ in range(detents):
            self.driver.turn_cw(1)
            self.sync()
            if flush:
                self.flush()

    @property
    def engine(self) -> Engine:
        return self.daemon.engine


def pace(driver, detents: int, rate: float) -> float:
    """Turn ``detents`` detents at ``rate`` per second on a fixed schedule; return the seconds taken."""
    started = time.perf_counter()
    for index in range(detents):
        delay = started + index / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        driver.turn_cw(1)
    return time.perf_counter() - started


# -- decode step and CPU per token -------------------------------------------------------


def _daemon_chunk(rig: Rig, tokens: int) -> tuple[float, float]:
    cpu_started = time.process_time()
    started = time.perf_counter()
    rig.crank_lockstep(tokens)
    wall = time.perf_counter() - started
    # Frames this chunk asked for belong to its CPU cost, so the count waits for them.
    rig.settle()
    return wall, time.process_time() - cpu_started


def _bare_chunk(rig: Rig, bare: BareLlama, tokens: int) -> tuple[float, float]:
    cpu_started = time.process_time()
    started = time.perf_counter()
    for _ in range(tokens):
        bare.step()
    wall = time.perf_counter() - started
    # The same pause as after a daemon chunk, so both sides start from the same rest.
    rig.settle()
    return wall, time.process_time() - cpu_started


def _decode_round(rig: Rig, bare: BareLlama, prompt_tokens: list[int], tokens: int, chunk: int,
                  daemon_first: bool) -> dict:
    """Run one story of ``tokens`` steps on each side, the sides taking turns every ``chunk`` steps."""
    rig.new_story()
    bare.prime(prompt_tokens)
    steps_before = rig.daemon.stats.steps
    restarts_before = bare.restarts
    pairs = []
    for index, first in enumerate(range(0, tokens, chunk)):
        count = min(chunk, tokens - first)
        order = ("daemon", "reference") if (index % 2 == 0) == daemon_first else ("reference", "daemon")
        measured = {}
        for side in order:
            measured[side] = _daemon_chunk(rig, count) if side == "daemon" else _bare_chunk(rig, bare, count)
        pairs.append({"tokens": count,
                      "daemon_s": measured["daemon"][0], "reference_s": measured["reference"][0],
                      "daemon_cpu_s": measured["daemon"][1], "reference_cpu_s": measured["reference"][1]})
    totals = {name: sum(pair[name] for pair in pairs)
              for name in ("daemon_s", "reference_s", "daemon_cpu_s", "reference_cpu_s")}
    return {
        "daemon_ms": totals["daemon_s"] * 1000 / tokens,
        "reference_ms": totals["reference_s"] * 1000 / tokens,
        "ratio": totals["daemon_s"] / totals["reference_s"],
        "daemon_cpu_ms": totals["daemon_cpu_s"] * 1000 / tokens,
        "reference_cpu_ms": totals["reference_cpu_s"] * 1000 / tokens,
        "cpu_ratio": totals["daemon_cpu_s"] / totals["reference_cpu_s"],
        "daemon_steps": rig.daemon.stats.steps - steps_before,
        "reference_restarts": bare.restarts - restarts_before,
        # With the same seed, logits and sampler chain both sides pick the same tokens,
        # which shows that they did the same work.
        "same_tokens": list(rig.engine.tokens) == bare.tokens,
        "pairs": pairs,
    }


def measure_decode(rig: Rig, bare: BareLlama, plan: Plan) -> dict:
    """Time lockstep detents through the daemon against bare decode steps, interleaved.

    Each round is one story per side, cranked in alternating chunks of
    ``plan.decode_chunk`` steps, and the side that goes first swaps every chunk and
    every round. A machine that speeds up or slows down during a round (other load,
    clock changes) so weighs on both sides of that round alike.
    """
    prompt_tokens = list(rig.engine.prompt_tokens)
    needed = len(prompt_tokens) + max(plan.decode_tokens, plan.warmup_tokens)
    if needed > rig.engine.n_ctx:
        raise BenchError(
            f"a decode round needs {needed} tokens of context but n_ctx is {rig.engine.n_ctx}; "
            "use a shorter first prompt"
        )

    log.info("decode step: warming up both sides with %d steps", plan.warmup_tokens)
    _decode_round(rig, bare, prompt_tokens, plan.warmup_tokens, plan.warmup_tokens, True)

    rounds = []
    for index in range(plan.decode_rounds):
        rounds.append(_decode_round(rig, bare, prompt_tokens, plan.decode_tokens, plan.decode_chunk,
                                    daemon_first=index % 2 == 1))
        log.info("decode step: round %d of %d: daemon %.2f ms, bare llama.cpp %.2f ms per token (%.3f)",
                 index + 1, plan.decode_rounds, rounds[-1]["daemon_ms"], rounds[-1]["reference_ms"],
                 rounds[-1]["ratio"])
    return {"prompt_tokens": len(prompt_tokens), "tokens_per_round": plan.decode_tokens,
            "chunk": plan.decode_chunk, "rounds": rounds}


# -- prefill -----------------------------------------------------------------------------


def measure_prefill(config, model_path: str, bare: BareLlama, prompt: str, plan: Plan) -> dict:
    """Alternate Engine.prime(prompt), timed around the whole call, with a bare batch decode."""
    rounds = []
    with Engine(model_path, engine_settings(config.model)) as engine:
        engine.prime(prompt)  # warm-up, and the tokens the reference decodes
        tokens = list(engine.prompt_tokens)
        prompt_text, special = engine.format_prompt(prompt)
        bare.prime(tokens)
        for index in range(plan.prefill_rounds):
            if index % 2 == 0:
                reference_ms = bare.prime(tokens)
                engine_ms, inner_ms = _timed_prime(engine, prompt)
            else:
                engine_ms, inner_ms = _timed_prime(engine, prompt)
                reference_ms = bare.prime(tokens)
            rounds.append({"engine_ms": engine_ms, "engine_inner_ms": inner_ms,
                           "reference_ms": reference_ms, "ratio": engine_ms / reference_ms})
    log.info("prefill: %d tokens, median %.1f ms through the engine, %.1f ms bare",
             len(tokens), statistics.median(r["engine_ms"] for r in rounds),
             statistics.median(r["reference_ms"] for r in rounds))
    return {"tokens": len(tokens), "n_batch": engine.settings.n_batch, "rounds": rounds,
            "prompt_text": prompt_text, "special": special}


def _timed_prime(engine: Engine, prompt: str) -> tuple[float, float]:
    started = time.perf_counter()
    inner = engine.prime(prompt)
    return (time.perf_counter() - started) * 1000, inner


# -- backlog -----------------------------------------------------------------------------

_COUNTED = ("received", "generated", "rewound", "cancelled", "dropped", "ignored")


def _counts(counters, before) -> dict:
    counts = {name: getattr(counters, name) - getattr(before, name) for name in _COUNTED}
    counts["pending"] = counters.pending
    counts["partial"] = counters.partial
    counts["unaccounted"] = counts["received"] - sum(
        counts[name] for name in ("generated", "rewound", "cancelled", "dropped", "ignored", "pending", "partial"))
    return counts


def measure_backlog(rig: Rig, plan: Plan) -> dict:
    """Crank at ``plan.backlog_rate`` detents per second from a pacing thread against real decoding."""
    rig.new_story()
    detents = round(plan.backlog_rate * plan.backlog_s)
    before = rig.queue.counters()
    if before.pending or before.partial:
        raise BenchError(f"the crank queue still contains {before.pending + before.partial} detents at the start "
                         "of the backlog phase; expected none")
    steps_before = rig.daemon.stats.steps
    rss_start = procfs.memory()["VmRSS"]

    elapsed: list[float] = []
    pacer = threading.Thread(target=lambda: elapsed.append(pace(rig.driver, detents, plan.backlog_rate)),
                             name="bench-pacer", daemon=True)
    log.info("backlog: %d detents at %g per second", detents, plan.backlog_rate)
    started = time.perf_counter()
    pacer.start()
    pacer.join()
    at_end = rig.queue.counters()
    steps_at_end = rig.daemon.stats.steps
    cranked_s = time.perf_counter() - started
    rig.sync()
    drained_s = time.perf_counter() - started
    drained = rig.queue.counters()
    rig.settle()
    rss_end = procfs.memory()["VmRSS"]

    return {
        "detents": detents,
        "rate": plan.backlog_rate,
        "achieved_rate": detents / elapsed[0],
        "cranked_s": cranked_s,
        "drained_s": drained_s,
        "max_backlog": rig.queue.max_backlog,
        "at_end_of_cranking": _counts(at_end, before),
        "after_drain": _counts(drained, before),
        "backlog_peak": drained.backlog_peak,
        "steps_while_cranking": steps_at_end - steps_before,
        "tokens_per_s_while_cranking": (steps_at_end - steps_before) / cranked_s,
        "rss_start": rss_start,
        "rss_end": rss_end,
    }


# -- display traffic ---------------------------------------------------------------------


def _display_run(rig: Rig, tokens: int, *, rate: float | None) -> dict:
    rig.new_story()
    stats_before = rig.display.stats
    steps_before = rig.daemon.stats.steps
    received_before = rig.queue.counters().received
    if rate is None:
        rig.crank_lockstep(tokens, flush=True)
    else:
        pace(rig.driver, tokens, rate)
        rig.sync()
        rig.flush()
    stats_after = rig.display.stats
    steps = rig.daemon.stats.steps - steps_before
    sent = stats_after.bytes_sent - stats_before.bytes_sent
    frames = stats_after.frames_sent - stats_before.frames_sent
    return {
        "detents_per_s": rate,
        "detents": rig.queue.counters().received - received_before,
        "tokens": steps,
        "bytes": sent,
        "frames": frames,
        "frames_skipped": stats_after.frames_skipped - stats_before.frames_skipped,
        "bytes_per_token": sent / steps if steps else 0.0,
        "bytes_per_frame": sent / frames if frames else 0.0,
    }


def measure_display(rig: Rig, plan: Plan) -> dict:
    """Count fake-SSD1306 bytes per token for a slow crank and for a fast one.

    Slow: lockstep with a flush after every detent, so every token's frame reaches the
    panel, as it does whenever the crank turns at most ``fps_max`` detents per second.
    Fast: FAST_CRANK_DETENTS_PER_S, where the frame-rate cap merges tokens into frames.
    """
    log.info("display traffic: %d tokens with every frame drawn, then at %g detents per second",
             plan.display_tokens, FAST_CRANK_DETENTS_PER_S)
    slow = _display_run(rig, plan.display_tokens, rate=None)
    fast = _display_run(rig, plan.display_tokens, rate=FAST_CRANK_DETENTS_PER_S)
    return {"fps_max": rig.config.display.fps_max, "every_frame": slow, "fast_crank": fast}
