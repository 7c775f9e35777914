"""The state the daemon hands the display after every decode step."""

from dataclasses import dataclass

__all__ = ["DisplayState"]


@dataclass(frozen=True)
class DisplayState:
    """A snapshot of the story and the engine's counters, drawn as one frame.

    The renderer tracks idle time itself from ``Display.activity`` calls and from
    updates whose ``text``, ``tokens`` or ``message`` changed, so the state carries
    no timestamps.
    """

    text: str = ""              # the story so far (prompt not included), newest at the end
    tokens: int = 0             # generated tokens in this story
    ctx_used: int = 0           # KV cache cells in use, prompt included
    n_ctx: int = 0              # context size; 0 when no model is loaded
    tokens_per_s: float = 0.0   # over the last few seconds, computed by the daemon
    ms_per_step: float = 0.0    # duration of the last decode step
    message: str = ""           # short state message ("loading model", "model error: ..."); "" for none

    def __post_init__(self):
        for name in ("text", "message"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"DisplayState.{name} must be str, not {type(getattr(self, name)).__name__}")
        for name in ("tokens", "ctx_used", "n_ctx", "tokens_per_s", "ms_per_step"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"DisplayState.{name} must be a number, not {type(value).__name__}")
