"""Format a benchmark result as a plain-text table, followed by the conditions of the run."""

from __future__ import annotations

from appliance.bench.figures import MIB, ORDER


def _ms(value: float) -> str:
    return f"{value:.2f} ms" if value < 100 else f"{value:.0f} ms"


def _ratio(value: float) -> str:
    return f"{value:.3f}"


def _percent(value: float) -> str:
    return f"{value * 100:.3g} %"


def _mib(value: float) -> str:
    return f"{value:.1f} MiB"


def _limit(goal: dict | None, *, percent: bool = False, unit: str = "") -> str:
    if goal is None:
        return "-"
    limit = _percent(goal["max"]) if percent else f"{goal['max']:g}{unit}"
    name = {"ratio": "ratio", "overhead_mib": "overhead", "rss_growth_mib": "growth"}[goal["of"]]
    return f"{name} ≤ {limit}"


def _row(key: str, figure: dict) -> list[str]:
    goal = figure["goal"]
    if key in ("decode_step", "prefill", "energy"):
        cells = [_ms(figure["value"]), _ms(figure["reference"]), _ratio(figure["ratio"]), _limit(goal)]
    elif key == "start_to_ready":
        cells = [f"{figure['value']:.2f} s", f"{figure['reference']:.2f} s", _ratio(figure["ratio"]), _limit(goal)]
    elif key == "idle":
        cells = [f"{figure['value'] * 1000:.1f} ms CPU", f"{figure['reference']:.1f} s",
                 _percent(figure["ratio"]), _limit(goal, percent=True)]
    elif key == "memory":
        cells = [_mib(figure["value"]), _mib(figure["reference"]), _ratio(figure["ratio"]),
                 _limit(goal, unit=" MiB")]
    elif key == "display_traffic":
        cells = [f"{figure['value']:.0f} B/token", f"{figure['reference']} B", _percent(figure["ratio"]),
                 _limit(goal, percent=True)]
    else:  # backlog
        cells = [_mib(figure["value"]), _mib(figure["reference"]), f"{figure['ratio']:.4f}",
                 _limit(goal, unit=" MiB")]
    met = figure["met"]
    if met is None:
        verdict = "-"
    elif met:
        verdict = "yes"
    else:
        verdict = "NO"
    if key == "memory":
        verdict += f" ({figure['overhead_mib']:+.1f} MiB)"
    elif key == "backlog":
        books = "books balance" if figure["balanced"] else "UNBALANCED"
        verdict += f" ({figure['rss_growth_mib']:+.2f} MiB, {books})"
    return [figure["label"], *cells, verdict]


def _columns(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]


def _details(result: dict) -> list[str]:
    machine, model, settings, figures = result["machine"], result["model"], result["settings"], result["figures"]
    decode, start = figures["decode_step"], figures["start_to_ready"]
    idle, memory = figures["idle"], figures["memory"]
    display, backlog = figures["display_traffic"], figures["backlog"]
    fast = display["fast_crank"]
    drained = backlog["after_drain"]
    at_end = backlog["at_end_of_cranking"]
    load = machine["loadavg_start"], machine["loadavg_end"]
    return [
        f"machine: {machine['cpu']}{' (' + machine['board'] + ')' if machine.get('board') else ''}, "
        f"{machine['usable_cores']} of {machine['cores']} cores usable, {machine['architecture']}, "
        f"{machine['python']}, llama-cpp-python {machine['llama_cpp_python']}; load average "
        f"{load[0][0]:.2f} at start, {load[1][0]:.2f} at end",
        f"model: {model['name']} ({model['path']}), {model['file_size'] / MIB:.1f} MiB, "
        f"{model['bits_per_weight']:.2f} bits per weight, file type {model['file_type']}; "
        f"n_ctx {settings['n_ctx']}, {settings['n_threads']} threads, n_batch {settings['n_batch']}, "
        f"{settings['prompt_format']} prompt of {decode['prompt_tokens']} tokens",
        f"decode step: {len(decode['rounds'])} rounds of {decode['tokens_per_round']} tokens per side in turns of "
        f"{decode['chunk']}; round ratios from {decode['ratio_spread'][0]:.3f} to {decode['ratio_spread'][1]:.3f}, "
        f"ratio of the total times {decode['ratio_of_totals']:.3f}; "
        f"same tokens on both sides: {'yes' if decode['same_tokens'] else 'no'}",
        f"start to ready: `crankllm run` {start['value']:.2f} s, bare llama.cpp process {start['reference']:.2f} s "
        f"(median of {len(start['rounds'])} round{'s' if len(start['rounds']) != 1 else ''}), best "
        f"{start['best_daemon_s']:.2f} s and {start['best_reference_s']:.2f} s; "
        f"{sum(code == 0 for code in start['exit_codes_after_sigterm'])} of "
        f"{len(start['exit_codes_after_sigterm'])} stopped cleanly on SIGTERM",
        f"idle: {idle['wakeups_per_s']:.2f} context switches per second over {idle['threads']} threads, "
        f"CPU from {idle['cpu_source']}, watchdog every {idle['watchdog_usec'] / 2e6:g} s",
        f"memory: {memory['model_mib']:.1f} MiB model + {memory['kv_cache_mib']:.1f} MiB KV cache; "
        + (f"the bare llama.cpp process peaks at {memory['bare_process_peak_mib']:.1f} MiB, so crankllm "
           f"adds {memory['overhead_over_bare_mib']:+.1f} MiB to it"
           if memory.get("bare_process_peak_mib") else "peak of the bare process unknown"),
        f"display: every frame drawn {display['every_frame']['bytes_per_frame']:.0f} B per frame; "
        f"at {fast['detents_per_s']:g} detents/s {fast['bytes_per_token']:.0f} B per token "
        f"({_percent(display['fast_crank_ratio'])} of a frame) in {fast['frames']} frames for "
        f"{fast['tokens']} tokens, fps_max {display['fps_max']:g}",
        f"backlog: {backlog['detents']} detents at {backlog['achieved_rate']:.0f}/s: "
        f"{at_end['generated']} stepped and {at_end['dropped']} dropped while cranking "
        f"({backlog['tokens_per_s_while_cranking']:.1f} tokens/s), {at_end['pending']} pending at the end, "
        f"peak {backlog['backlog_peak']} of {backlog['max_backlog']}; after the drain "
        f"{drained['generated']} stepped, {drained['dropped']} dropped",
    ]


def format_table(result: dict) -> str:
    """Return the figures as an aligned table followed by the run's conditions."""
    header = ["figure", "crankllm", "reference", "ratio", "goal", "met"]
    rows = [header] + [_row(key, result["figures"][key]) for key in ORDER]
    lines = _columns(rows)
    lines.insert(1, "-" * max(len(line) for line in lines))
    title = "crankllm bench" + (" --quick (short phases, noisy figures)" if result.get("quick") else "")
    return "\n".join([title, "", *lines, "", *_details(result)]) + "\n"
