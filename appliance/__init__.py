"""crankllm: a hand-cranked LLM appliance, one encoder detent per llama.cpp decode step."""

__version__ = "0.1.0"
