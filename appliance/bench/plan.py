"""How long each benchmark phase runs: the full plan and the --quick plan."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Plan:
    """Lengths of the benchmark phases, in tokens, rounds, detents and seconds."""

    # Decode step: warm-up steps per side, then rounds of this many steps per side,
    # the sides taking turns every decode_chunk steps.
    warmup_tokens: int
    decode_rounds: int
    decode_tokens: int
    decode_chunk: int
    # Prefill: rounds of one Engine.prime and one bare batch decode each.
    prefill_rounds: int
    # Start to ready: rounds of one reference process and one `crankllm run` each.
    start_rounds: int
    # Idle: seconds to let the started daemon settle, then seconds to measure it.
    idle_settle_s: float
    idle_s: float
    # Display traffic: tokens of one story per crank speed.
    display_tokens: int
    # Backlog: detents per second from the pacing thread, for this many seconds.
    backlog_rate: float
    backlog_s: float
    # Maximum wait for a process to send READY=1, or to exit after SIGTERM.
    process_timeout_s: float = 300.0

    def __post_init__(self):
        for name, value in asdict(self).items():
            if value <= 0:
                raise ValueError(f"invalid benchmark plan: {name} = {value!r}; expected a positive number")

    def as_dict(self) -> dict:
        return asdict(self)


FULL = Plan(
    warmup_tokens=20,
    decode_rounds=7,
    decode_tokens=200,
    decode_chunk=10,
    prefill_rounds=9,
    start_rounds=7,
    idle_settle_s=2.0,
    idle_s=10.0,
    display_tokens=200,
    backlog_rate=200.0,
    backlog_s=10.0,
)

# Short enough for the test suite; the figures are as noisy as such short phases make them.
QUICK = Plan(
    warmup_tokens=4,
    decode_rounds=3,
    decode_tokens=20,
    decode_chunk=5,
    prefill_rounds=3,
    start_rounds=1,
    idle_settle_s=0.2,
    idle_s=1.0,
    display_tokens=20,
    backlog_rate=200.0,
    backlog_s=1.0,
)
