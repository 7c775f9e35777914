"""Turn phase measurements into figures: value, reference, ratio, goal and verdict.

Every figure has the same keys, so the JSON and the table treat them alike:

    label, unit, value, reference, ratio, reference_is, goal, met, and details

``goal`` is None or {"of": KEY, "max": LIMIT}: the figure's KEY must not exceed LIMIT.
Where the two sides take turns in rounds, ``value`` and ``reference`` are the medians
of each side's per-round figure and ``ratio`` is the median of the per-round ratios.
Both sides of a round ran interleaved or seconds apart, so a drift of the machine's
speed cancels within the round, and the median discards a round that other load
spoiled. Start to ready is the exception: its ratio is that of the two medians.
"""

from __future__ import annotations

import statistics

MIB = 2**20
FRAME_BYTES = 128 * 64 // 8  # one full SSD1306 frame of a 128x64 panel: 8 pages of 128 columns

GOALS = {
    "decode_step": {"of": "ratio", "max": 1.05},
    "prefill": {"of": "ratio", "max": 1.05},
    "start_to_ready": {"of": "ratio", "max": 1.2},
    "idle": {"of": "ratio", "max": 0.001},
    "memory": {"of": "overhead_mib", "max": 60.0},
    "display_traffic": {"of": "ratio", "max": 0.30},
    # NOTE: 4 MiB is this harness's own limit for "flat": above the noise of Python's
    # allocator over one phase, below what a leak of one frame per detent would add over
    # the full plan's 2,000 detents. Fix it once a Pi run shows its own noise.
    "backlog": {"of": "rss_growth_mib", "max": 4.0},
    "energy": None,
}

ORDER = ("decode_step", "prefill", "start_to_ready", "idle", "memory", "display_traffic", "backlog", "energy")


def _median(rounds: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rounds)


def _spread(rounds: list[dict], key: str) -> list[float]:
    return [min(r[key] for r in rounds), max(r[key] for r in rounds)]


def _figure(key: str, *, label: str, unit: str, value: float, reference: float, ratio: float,
            reference_is: str, **details) -> dict:
    figure = {"label": label, "unit": unit, "value": value, "reference": reference, "ratio": ratio,
              "reference_is": reference_is, "goal": GOALS[key]}
    figure.update(details)
    goal = GOALS[key]
    figure["met"] = None if goal is None else bool(figure[goal["of"]] <= goal["max"])
    return figure


def _quartiles(values: list[float]) -> list[float]:
    if len(values) < 2:
        return [values[0], values[0]]
    q1, _, q3 = statistics.quantiles(values, n=4)
    return [q1, q3]


def _pairs(decode: dict) -> list[dict]:
    return [pair for round_ in decode["rounds"] for pair in round_["pairs"]]


def decode_step(decode: dict) -> dict:
    pairs = _pairs(decode)
    pair_ratios = [pair["daemon_s"] / pair["reference_s"] for pair in pairs]
    rounds = [{name: value for name, value in round_.items() if name != "pairs"} for round_ in decode["rounds"]]
    return _figure(
        "decode_step", label="decode step", unit="ms",
        value=_median(rounds, "daemon_ms"), reference=_median(rounds, "reference_ms"),
        ratio=_median(rounds, "ratio"), ratio_spread=_spread(rounds, "ratio"),
        reference_is="bare llama.cpp loop: llama_sampler_sample + llama_decode of 1 token",
        method="lockstep: one detent on MockFactory pins, then wait until the daemon has handled it; "
               "the sides take turns every chunk of steps within each round",
        ratio_of_totals=sum(pair["daemon_s"] for pair in pairs) / sum(pair["reference_s"] for pair in pairs),
        pairs=len(pairs), pair_ratio_quartiles=_quartiles(pair_ratios),
        tokens_per_round=decode["tokens_per_round"], chunk=decode["chunk"], prompt_tokens=decode["prompt_tokens"],
        same_tokens=all(r["same_tokens"] for r in rounds), rounds=rounds,
    )


def energy(decode: dict) -> dict:
    rounds = decode["rounds"]
    pairs = _pairs(decode)
    return _figure(
        "energy", label="CPU per token", unit="ms",
        value=_median(rounds, "daemon_cpu_ms"), reference=_median(rounds, "reference_cpu_ms"),
        ratio=_median(rounds, "cpu_ratio"), ratio_spread=_spread(rounds, "cpu_ratio"),
        ratio_of_totals=sum(pair["daemon_cpu_s"] for pair in pairs) / sum(pair["reference_cpu_s"] for pair in pairs),
        reference_is="CPU time of the bare llama.cpp loop per token",
        method="time.process_time over the decode-step rounds, every thread of this process; the daemon's "
               "side includes the frames its render thread drew for its chunks",
    )


def prefill(measured: dict) -> dict:
    rounds = measured["rounds"]
    return _figure(
        "prefill", label="prefill", unit="ms",
        value=_median(rounds, "engine_ms"), reference=_median(rounds, "reference_ms"),
        ratio=_median(rounds, "ratio"), ratio_spread=_spread(rounds, "ratio"),
        reference_is="bare llama.cpp batch decode of the same tokens",
        method="Engine.prime timed around the whole call: chat template, tokenizer, context clear, decode",
        tokens=measured["tokens"], n_batch=measured["n_batch"], rounds=rounds,
    )


def start_to_ready(measured: dict) -> dict:
    rounds = measured["rounds"]
    daemon = _median(rounds, "daemon_s")
    reference = _median(rounds, "reference_s")
    best_daemon = min(r["daemon_s"] for r in rounds)
    best_reference = min(r["reference_s"] for r in rounds)
    # One process start is a single short event, so other load can double it. The
    # ratio of one round's two starts then carries the noise of both, and the ratio
    # of the two medians is the steadier figure.
    return _figure(
        "start_to_ready", label="start to ready", unit="s",
        value=daemon, reference=reference, ratio=daemon / reference, ratio_spread=_spread(rounds, "ratio"),
        best_daemon_s=best_daemon, best_reference_s=best_reference, best_ratio=best_daemon / best_reference,
        reference_is="fresh `python -c` process: import llama_cpp, load the model, decode the prompt",
        method="from just before the fork to the READY=1 datagram on a bound NOTIFY_SOCKET; "
               "model file in the page cache",
        command=measured["daemon_command"], rounds=rounds,
        # Negative: killed by that signal number instead of stopping cleanly on SIGTERM.
        exit_codes_after_sigterm=measured["daemon_exit_codes"],
    )


def idle(measured: dict) -> dict:
    data = measured["idle"]
    return _figure(
        "idle", label="idle CPU", unit="s",
        value=data["cpu_s"], reference=data["wall_s"], ratio=data["cpu_s"] / data["wall_s"],
        reference_is="wall time at rest, as CPU seconds of one core",
        method="CPU time of every thread of the `crankllm run` process with the crank at rest, "
               "after READY=1 and a settling pause",
        **{name: data[name] for name in ("cpu_source", "stat_cpu_s", "stat_resolution_s", "context_switches",
                                          "threads", "watchdog_usec")},
        wakeups_per_s=data["context_switches"] / data["wall_s"],
    )


def memory(measured: dict, *, model_bytes: int, kv_bytes: int) -> dict:
    data = measured["memory"]
    reference = model_bytes + kv_bytes
    hwm = data["VmHWM"]
    bare = [r["reference_vm_hwm"] for r in measured["rounds"] if r["reference_vm_hwm"]]
    return _figure(
        "memory", label="peak RSS", unit="MiB",
        value=hwm / MIB, reference=reference / MIB, ratio=hwm / reference,
        reference_is="model file size + F16 KV cache bytes",
        method="VmHWM of the `crankllm run` process after READY=1 and the idle phase",
        overhead_mib=(hwm - reference) / MIB,
        model_mib=model_bytes / MIB, kv_cache_mib=kv_bytes / MIB,
        rss_mib=data["VmRSS"] / MIB,
        bare_process_peak_mib=max(bare) / MIB if bare else None,
        overhead_over_bare_mib=(hwm - max(bare)) / MIB if bare else None,
    )


def display_traffic(measured: dict) -> dict:
    slow = measured["every_frame"]
    fast = measured["fast_crank"]
    return _figure(
        "display_traffic", label="display traffic", unit="B/token",
        value=slow["bytes_per_token"], reference=FRAME_BYTES, ratio=slow["bytes_per_token"] / FRAME_BYTES,
        reference_is="one full 128x64 frame (1,024 data bytes)",
        method="bytes (commands and data) on the fake SSD1306 bus per token over one story, every token's "
               "frame drawn: what the panel receives at any crank speed up to fps_max detents per second",
        fps_max=measured["fps_max"], every_frame=slow, fast_crank=fast,
        fast_crank_ratio=fast["bytes_per_token"] / FRAME_BYTES,
    )


def backlog(measured: dict) -> dict:
    growth = (measured["rss_end"] - measured["rss_start"]) / MIB
    figure = _figure(
        "backlog", label="backlog RSS", unit="MiB",
        value=measured["rss_end"] / MIB, reference=measured["rss_start"] / MIB,
        ratio=measured["rss_end"] / measured["rss_start"],
        reference_is="RSS of the benchmark process before the flood of detents",
        method="a pacing thread turns the MockFactory crank at a fixed rate against real decode steps",
        rss_growth_mib=growth,
        **{name: measured[name] for name in (
            "detents", "rate", "achieved_rate", "cranked_s", "drained_s", "max_backlog", "backlog_peak",
            "at_end_of_cranking", "after_drain", "steps_while_cranking", "tokens_per_s_while_cranking")},
    )
    balanced = measured["at_end_of_cranking"]["unaccounted"] == 0 and measured["after_drain"]["unaccounted"] == 0
    figure["balanced"] = balanced
    figure["met"] = figure["met"] and balanced
    return figure
