"""The llama.cpp sampler chain built from the [model] sampling settings."""

from __future__ import annotations

import logging
import secrets

import llama_cpp

log = logging.getLogger(__name__)

# The penalties sampler is always the chain's first element, so a rewind can reset it
# alone (resetting the whole chain would also reseed the dist sampler's RNG).
PENALTIES_INDEX = 0


def resolve_seed(seed: int | str) -> int:
    """Return ``seed`` as a 32-bit integer, drawing one for "random"."""
    if seed == "random":
        drawn = secrets.randbits(32)
        log.info("sampler seed drawn at random: %d (set [model] seed to repeat this run)", drawn)
        return drawn
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ValueError(f"invalid seed {seed!r}: expected an integer 0..4294967295 or \"random\"")
    return seed


def build_chain(
    *,
    n_vocab: int,
    seed: int,
    temperature: float,
    top_k: int,
    top_p: float,
    min_p: float,
    repeat_penalty: float,
    repeat_last_n: int,
):
    """Create the sampler chain; the caller owns it and frees it with llama_sampler_free.

    Temperature 0 means greedy decoding: the most likely token after the penalties.
    """
    params = llama_cpp.llama_sampler_chain_default_params()
    params.no_perf = True
    chain = llama_cpp.llama_sampler_chain_init(params)
    add = llama_cpp.llama_sampler_chain_add
    # In the llama.cpp that llama-cpp-python 0.3.36 vendors, the penalties sampler still
    # takes n_vocab first (checked in the library: it reads penalty_last_n from the
    # second integer argument).
    add(chain, llama_cpp.llama_sampler_init_penalties(
        n_vocab, repeat_last_n, repeat_penalty, 0.0, 0.0
    ))
    if temperature <= 0:
        add(chain, llama_cpp.llama_sampler_init_greedy())
        return chain
    if top_k > 0:
        add(chain, llama_cpp.llama_sampler_init_top_k(top_k))
    if top_p < 1.0:
        add(chain, llama_cpp.llama_sampler_init_top_p(top_p, 1))
    if min_p > 0.0:
        add(chain, llama_cpp.llama_sampler_init_min_p(min_p, 1))
    add(chain, llama_cpp.llama_sampler_init_temp(temperature))
    add(chain, llama_cpp.llama_sampler_init_dist(seed))
    return chain


def reset_penalties(chain, history: list[int]) -> None:
    """Make the penalties sampler remember exactly ``history`` (oldest first)."""
    penalties = llama_cpp.llama_sampler_chain_get(chain, PENALTIES_INDEX)
    llama_cpp.llama_sampler_reset(penalties)
    for token in history:
        llama_cpp.llama_sampler_accept(penalties, token)
