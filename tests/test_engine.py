"""The decode engine against real llama.cpp: the default model and the tiny Q2_K model."""

from __future__ import annotations

import pytest

from appliance.engine.engine import Engine, EngineSettings
from appliance.engine.gguf import read_gguf

PROMPT = "Tell me a story about a lighthouse keeper."


def make(model, **settings):
    return Engine(model, EngineSettings(n_threads=2, **settings))


def test_same_seed_same_tokens(default_model):
    runs = []
    for _ in range(2):
        with make(default_model, seed=1234) as engine:
            engine.prime(PROMPT)
            runs.append([engine.step().token for _ in range(50)])
    assert runs[0] == runs[1]
    assert len(set(runs[0])) > 5


def test_different_seed_differs(default_model):
    runs = []
    for seed in (1, 2):
        with make(default_model, seed=seed, temperature=1.0) as engine:
            engine.prime(PROMPT)
            runs.append([engine.step().token for _ in range(30)])
    assert runs[0] != runs[1]


def test_rewind_then_step_reproduces(default_model):
    with make(default_model, temperature=0.0, seed=0) as engine:
        engine.prime(PROMPT)
        tokens = [engine.step().token for _ in range(10)]
        text_after_7 = engine.detokenize(tokens[:7])
        removed = engine.rewind(3)
        assert engine.tokens == tokens[:7]
        assert engine.text == text_after_7
        assert text_after_7 + removed == engine.detokenize(tokens)
        again = [engine.step().token for _ in range(3)]
    assert again == tokens[7:]


def test_rewind_stops_at_prompt(default_model):
    with make(default_model, seed=5) as engine:
        engine.prime(PROMPT)
        for _ in range(4):
            engine.step()
        engine.rewind(100)
        assert engine.n_generated == 0
        assert engine.text == ""
        assert engine.n_past == len(engine.prompt_tokens)
        assert engine.step().token is not None


@pytest.mark.parametrize("model_name", ["default_model", "tiny_model"])
def test_text_invariant_200_steps(model_name, request):
    model = request.getfixturevalue(model_name)
    with make(model, seed=99, temperature=1.2, prompt_format="raw", n_ctx=512) as engine:
        engine.prime("Emoji and accents: café, naïve, 🚲🌊 ")
        shown = ""
        for _ in range(200):
            result = engine.step()
            if result.event == "end":
                break
            shown += result.text
            full = engine.detokenize(engine.tokens)
            assert shown == engine.text
            assert full.startswith(shown)
            # Held-back bytes are at most one incomplete character.
            assert len(full) - len(shown) <= 1
        assert engine.n_generated > 20


@pytest.mark.parametrize("policy", ["shift", "restart", "stop"])
def test_context_policies_small_context(default_model, policy):
    with make(default_model, n_ctx=64, seed=3, context_policy=policy, end_policy="restart") as engine:
        engine.prime("Write a long story.")
        events = []
        for _ in range(300):
            result = engine.step()
            assert engine.n_past <= 64
            events.append(result.event)
    if policy == "stop":
        assert "end" in events
        assert events[-1] == "end"
    elif policy == "shift":
        assert "shifted" in events
    else:
        assert "restarted" in events


def test_shift_keeps_story_text(default_model):
    with make(default_model, n_ctx=64, seed=3, context_policy="shift", prompt_format="raw") as engine:
        engine.prime("Once upon a time, in a village by the sea,")
        shown = ""
        results = [engine.step() for _ in range(120)]
        shown = "".join(r.text for r in results)
        decoded = sum(1 for r in results if r.event != "end")
        assert "shifted" in [r.event for r in results]
        assert engine.text == shown
        assert engine.n_generated == decoded
        assert engine.n_generated > 64


def test_end_of_text_stop_policy(default_model):
    # A chat model asked for one word ends its turn quickly; greedy keeps it repeatable.
    with make(default_model, temperature=0.0, seed=0, end_policy="stop") as engine:
        engine.prime("Reply with just the word yes.")
        results = [engine.step() for _ in range(40)]
        events = [r.event for r in results]
        assert "end" in events
        first_end = events.index("end")
        assert all(e == "end" for e in events[first_end:])
        assert engine.ended
        generated = engine.n_generated
        assert engine.step().event == "end"
        assert engine.n_generated == generated


def test_end_of_text_restart_policy(default_model):
    with make(default_model, temperature=0.0, seed=0, end_policy="restart") as engine:
        engine.prime("Reply with just the word yes.")
        events = [engine.step().event for _ in range(40)]
    assert "restarted" in events
    assert "end" not in events


def test_tiny_model_is_genuine_q2k(tiny_model):
    info = read_gguf(tiny_model)
    assert info.file_type == "Q2_K"
    assert info.type_counts["Q2_K"] >= 8
    assert info.fallbacks()[0] == 0
    assert info.bits_per_weight < 3.5


def test_tiny_model_decodes(tiny_model):
    with make(tiny_model, seed=11, prompt_format="raw", n_ctx=128) as engine:
        engine.prime("the crank turns")
        tokens = [engine.step().token for _ in range(40)]
    assert all(isinstance(t, int) for t in tokens)
    assert len(set(tokens)) > 3


def test_chat_prompt_uses_template(default_model):
    with make(default_model, seed=1) as engine:
        text, special = engine.format_prompt("hello")
    assert special
    assert "<|im_start|>user" in text
    assert text.rstrip().endswith("<|im_start|>assistant")


def test_seed_random_is_recorded(default_model):
    with make(default_model, seed="random") as engine:
        assert 0 <= engine.seed < 2**32


def test_close_is_idempotent(tiny_model):
    engine = make(tiny_model, prompt_format="raw")
    engine.close()
    engine.close()
