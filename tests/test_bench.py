"""`crankllm bench --quick` on the tiny model: the JSON's shape, its accounting and the table.

The harness runs once for the module (a few seconds with the tiny model). No test
bounds a time: the figures of a quick run on a shared machine are noise, so only
their presence, sign and internal consistency are checked.
"""

from __future__ import annotations

import json
import math
import types

import pytest

from appliance import bench
from appliance.bench.figures import GOALS, ORDER
from appliance.bench.plan import QUICK, Plan

FIGURE_KEYS = ("label", "unit", "value", "reference", "ratio", "reference_is", "goal", "met")
COUNTER_FIELDS = ("generated", "rewound", "cancelled", "dropped", "ignored", "pending", "partial")


@pytest.fixture(scope="module")
def quick_run(tiny_model, tmp_path_factory):
    json_path = tmp_path_factory.mktemp("bench") / "bench.json"
    result = bench.run(model=tiny_model, json_path=json_path, quick=True)
    return result, json_path


@pytest.fixture
def result(quick_run):
    return quick_run[0]


def test_json_file_equals_result(quick_run):
    result, json_path = quick_run
    assert json.loads(json_path.read_text(encoding="utf-8")) == json.loads(json.dumps(result))


@pytest.mark.parametrize("key", ORDER)
def test_figure_has_value_reference_ratio(result, key):
    figure = result["figures"][key]
    for name in FIGURE_KEYS:
        assert name in figure, f"{key} lacks {name}"
    assert figure["goal"] == GOALS[key]


@pytest.mark.parametrize("key", ORDER)
def test_figure_numbers_finite(result, key):
    figure = result["figures"][key]
    for name in ("value", "reference", "ratio"):
        assert isinstance(figure[name], (int, float)), f"{key} {name} is {figure[name]!r}"
        assert math.isfinite(figure[name]), f"{key} {name} is {figure[name]!r}"
    assert figure["reference"] > 0
    if key == "idle":
        # A daemon at rest may use no measurable CPU at all.
        assert figure["value"] >= 0
        assert figure["ratio"] >= 0
    else:
        assert figure["value"] > 0
        assert figure["ratio"] > 0


@pytest.mark.parametrize("key", [key for key in ORDER if GOALS[key] is not None and key != "backlog"])
def test_figure_verdict_follows_goal(result, key):
    figure = result["figures"][key]
    goal = figure["goal"]
    assert figure["met"] is (figure[goal["of"]] <= goal["max"])


def test_energy_has_no_goal(result):
    assert result["figures"]["energy"]["goal"] is None
    assert result["figures"]["energy"]["met"] is None


@pytest.mark.parametrize("key", ["decode_step", "prefill"])
def test_ratio_within_round_ratios(result, key):
    figure = result["figures"][key]
    ratios = sorted(r["ratio"] for r in figure["rounds"])
    assert figure["ratio_spread"] == [ratios[0], ratios[-1]]
    assert ratios[0] <= figure["ratio"] <= ratios[-1]


def test_start_ratio_of_medians(result):
    figure = result["figures"]["start_to_ready"]
    assert figure["ratio"] == pytest.approx(figure["value"] / figure["reference"])
    assert figure["best_daemon_s"] <= figure["value"]
    assert figure["best_reference_s"] <= figure["reference"]


def test_energy_ratio_within_spread(result):
    figure = result["figures"]["energy"]
    low, high = figure["ratio_spread"]
    assert low <= figure["ratio"] <= high


def test_decode_pairs_cover_rounds(result):
    figure = result["figures"]["decode_step"]
    chunks_per_side = -(-QUICK.decode_tokens // QUICK.decode_chunk)
    assert figure["pairs"] == QUICK.decode_rounds * chunks_per_side


def test_decode_sides_did_same_work(result):
    figure = result["figures"]["decode_step"]
    assert len(figure["rounds"]) == QUICK.decode_rounds
    for index, round_ in enumerate(figure["rounds"]):
        assert round_["daemon_steps"] == QUICK.decode_tokens, f"round {index}"
        assert round_["same_tokens"], f"round {index}"


@pytest.mark.parametrize("stage", ["at_end_of_cranking", "after_drain"])
def test_backlog_books_balance(result, stage):
    backlog = result["figures"]["backlog"]
    counts = backlog[stage]
    assert counts["received"] == backlog["detents"]
    assert counts["received"] == sum(counts[name] for name in COUNTER_FIELDS)
    assert counts["unaccounted"] == 0


def test_backlog_drains_every_detent(result):
    backlog = result["figures"]["backlog"]
    drained = backlog["after_drain"]
    assert drained["pending"] == 0
    assert drained["partial"] == 0
    assert drained["generated"] + drained["dropped"] == backlog["detents"]
    assert backlog["balanced"] is True
    assert 0 < backlog["backlog_peak"] <= backlog["max_backlog"]


def test_display_counts_bytes_per_token(result):
    display = result["figures"]["display_traffic"]
    every = display["every_frame"]
    assert every["tokens"] == QUICK.display_tokens
    assert every["frames"] + every["frames_skipped"] == every["tokens"]
    assert display["reference"] == 1024
    assert display["value"] == pytest.approx(every["bytes"] / every["tokens"])
    assert display["fast_crank"]["detents_per_s"] > 0


def test_memory_reference_is_model_and_kv(result):
    memory = result["figures"]["memory"]
    model = result["model"]
    assert memory["reference"] * 2**20 == pytest.approx(model["file_size"] + model["kv_cache_bytes"])
    assert memory["overhead_mib"] == pytest.approx(memory["value"] - memory["reference"])


def test_idle_measured_on_running_daemon(result):
    idle = result["figures"]["idle"]
    assert idle["reference"] >= QUICK.idle_s
    assert idle["threads"] >= 2


def test_start_rounds_recorded(result):
    start = result["figures"]["start_to_ready"]
    assert len(start["rounds"]) == QUICK.start_rounds
    assert start["command"][1:3] == ["run", "--config"]
    assert all(isinstance(code, int) for code in start["exit_codes_after_sigterm"])


def test_machine_and_model_recorded(result, tiny_model):
    machine = result["machine"]
    for name in ("cpu", "cores", "python", "llama_cpp_python", "llama_system_info"):
        assert machine[name], name
    model = result["model"]
    assert model["path"] == tiny_model
    assert model["file_size"] > 0
    assert model["bits_per_weight"] > 0
    settings = result["settings"]
    assert settings["n_ctx"] >= 16
    assert settings["n_threads"] >= 1
    assert result["quick"] is True
    assert result["format"] == bench.FORMAT


def test_table_lists_every_figure(result):
    table = bench.format_table(result)
    for key in ORDER:
        assert result["figures"][key]["label"] in table
    assert "--quick" in table


def test_table_marks_missed_goal(result):
    changed = json.loads(json.dumps(result))
    changed["figures"]["decode_step"]["met"] = False
    row = next(line for line in bench.format_table(changed).splitlines() if line.startswith("decode step"))
    assert row.rstrip().endswith("NO")


def test_main_prints_table(result, monkeypatch, capsys):
    calls = []

    def fake_run(**kwargs):
        calls.append(kwargs)
        return result

    monkeypatch.setattr(bench, "run", fake_run)
    args = types.SimpleNamespace(model="m.gguf", json="out.json", quick=True)
    assert bench.main(args) == 0
    assert calls == [{"model": "m.gguf", "json_path": "out.json", "quick": True, "threads": None}]
    assert "decode step" in capsys.readouterr().out


def test_plan_rejects_zero():
    fields = QUICK.as_dict() | {"idle_s": 0}
    with pytest.raises(ValueError, match="idle_s"):
        Plan(**fields)


def test_run_rejects_zero_threads(tiny_model):
    with pytest.raises(ValueError, match="threads"):
        bench.run(model=tiny_model, threads=0)
