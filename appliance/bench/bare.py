"""The references: llama.cpp driven through llama-cpp-python's low-level API and nothing else.

``BareLlama`` is the in-process reference for the decode step and the prefill. It
loads the model, creates the context and builds the sampler chain with direct
``llama_cpp`` calls, so no crankllm code runs between two decodes. It copies the
engine only where the work must be the same. Both use the same context and batch
sizes, threads, and sampler chain in the same order. Both answer an end-of-generation
token alike: they clear the context, decode the prompt again and sample again.

``START_SCRIPT`` is the reference for start to ready: a fresh ``python -c`` process
that imports llama_cpp, loads the model, decodes the prompt and sends READY=1.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import llama_cpp

from appliance.errors import EngineError, ModelError


@dataclass(frozen=True)
class Sampling:
    """Sampler settings, as in the [model] config section."""

    seed: int
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    repeat_penalty: float
    repeat_last_n: int


class BareLlama:
    """A model, a context and a sampler chain, stepped one token at a time."""

    def __init__(self, model_path: str, *, n_ctx: int, n_batch: int, n_threads: int,
                 use_extra_bufts: bool, sampling: Sampling):
        self.n_batch = n_batch
        self.prompt_tokens: list[int] = []
        self.tokens: list[int] = []
        self.restarts = 0
        self._resources = contextlib.ExitStack()
        try:
            self._load(model_path, n_ctx, n_batch, n_threads, use_extra_bufts, sampling)
        except BaseException:
            self._resources.close()
            raise
        self._one = (llama_cpp.llama_token * 1)()

    def _load(self, model_path, n_ctx, n_batch, n_threads, use_extra_bufts, sampling) -> None:
        model_params = llama_cpp.llama_model_default_params()
        model_params.use_extra_bufts = use_extra_bufts
        self.model = llama_cpp.llama_model_load_from_file(model_path.encode(), model_params)
        if not self.model:
            raise ModelError(f"llama.cpp could not load {model_path} for the reference")
        self._resources.callback(llama_cpp.llama_model_free, self.model)
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)

        context_params = llama_cpp.llama_context_default_params()
        context_params.n_ctx = n_ctx
        context_params.n_batch = n_batch
        context_params.n_ubatch = n_batch
        context_params.n_seq_max = 1
        context_params.n_threads = n_threads
        context_params.n_threads_batch = n_threads
        context_params.no_perf = True
        self.ctx = llama_cpp.llama_init_from_model(self.model, context_params)
        if not self.ctx:
            raise ModelError(f"llama.cpp could not create a context of {n_ctx} tokens for the reference")
        self._resources.callback(llama_cpp.llama_free, self.ctx)
        self.memory = llama_cpp.llama_get_memory(self.ctx)

        self.chain = self._build_chain(sampling)
        self._resources.callback(llama_cpp.llama_sampler_free, self.chain)

    def _build_chain(self, s: Sampling):
        params = llama_cpp.llama_sampler_chain_default_params()
        params.no_perf = True
        chain = llama_cpp.llama_sampler_chain_init(params)
        add = llama_cpp.llama_sampler_chain_add
        # The same elements in the same order as the engine's chain, so both draw the
        # same random numbers and, with the same logits, pick the same tokens. In
        # llama-cpp-python 0.3.36 the penalties sampler takes n_vocab first.
        n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        add(chain, llama_cpp.llama_sampler_init_penalties(n_vocab, s.repeat_last_n, s.repeat_penalty, 0.0, 0.0))
        if s.temperature <= 0:
            add(chain, llama_cpp.llama_sampler_init_greedy())
            return chain
        if s.top_k > 0:
            add(chain, llama_cpp.llama_sampler_init_top_k(s.top_k))
        if s.top_p < 1.0:
            add(chain, llama_cpp.llama_sampler_init_top_p(s.top_p, 1))
        if s.min_p > 0.0:
            add(chain, llama_cpp.llama_sampler_init_min_p(s.min_p, 1))
        add(chain, llama_cpp.llama_sampler_init_temp(s.temperature))
        add(chain, llama_cpp.llama_sampler_init_dist(s.seed))
        return chain

    def close(self) -> None:
        self._resources.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def prime(self, tokens: list[int]) -> float:
        """Clear the context, forget the penalty history and batch-decode ``tokens``; return ms."""
        started = time.perf_counter()
        llama_cpp.llama_memory_clear(self.memory, True)
        llama_cpp.llama_sampler_reset(llama_cpp.llama_sampler_chain_get(self.chain, 0))
        for start in range(0, len(tokens), self.n_batch):
            chunk = tokens[start:start + self.n_batch]
            array = (llama_cpp.llama_token * len(chunk))(*chunk)
            self._check(llama_cpp.llama_decode(self.ctx, llama_cpp.llama_batch_get_one(array, len(chunk))))
        self.prompt_tokens = list(tokens)
        self.tokens = []
        return (time.perf_counter() - started) * 1000

    def step(self) -> int:
        """Sample one token and decode it; an end-of-generation token restarts the prompt first."""
        token = llama_cpp.llama_sampler_sample(self.chain, self.ctx, -1)
        if llama_cpp.llama_vocab_is_eog(self.vocab, token):
            self.restarts += 1
            self.prime(self.prompt_tokens)
            token = llama_cpp.llama_sampler_sample(self.chain, self.ctx, -1)
        self._one[0] = token
        self._check(llama_cpp.llama_decode(self.ctx, llama_cpp.llama_batch_get_one(self._one, 1)))
        self.tokens.append(token)
        return token

    def _check(self, rc: int) -> None:
        if rc != 0:
            raise EngineError(f"llama_decode failed with code {rc} in the reference")


# Run as `python -c START_SCRIPT MODEL N_CTX N_BATCH N_THREADS EXTRA_BUFTS SPECIAL PROMPT`.
# It sends READY=1 once the prompt is decoded, then prints its peak RSS (VmHWM, in kB)
# for the report. NOTIFY_SOCKET is a filesystem path here, because the harness binds it.
START_SCRIPT = r"""
import os, socket, sys
import llama_cpp

path, n_ctx, n_batch, n_threads, extra, special, text = sys.argv[1:8]
n_batch = int(n_batch)
llama_cpp.llama_backend_init()
model_params = llama_cpp.llama_model_default_params()
model_params.use_extra_bufts = extra == "1"
model = llama_cpp.llama_model_load_from_file(path.encode(), model_params)
if not model:
    sys.exit("model load failed")
context_params = llama_cpp.llama_context_default_params()
context_params.n_ctx = int(n_ctx)
context_params.n_batch = n_batch
context_params.n_ubatch = n_batch
context_params.n_seq_max = 1
context_params.n_threads = int(n_threads)
context_params.n_threads_batch = int(n_threads)
context_params.no_perf = True
ctx = llama_cpp.llama_init_from_model(model, context_params)
if not ctx:
    sys.exit("context creation failed")
vocab = llama_cpp.llama_model_get_vocab(model)
data = text.encode("utf-8")
buffer = (llama_cpp.llama_token * (len(data) + 16))()
n = llama_cpp.llama_tokenize(vocab, data, len(data), buffer, len(data) + 16, True, special == "1")
if n <= 0:
    sys.exit("tokenize failed")
tokens = list(buffer[:n])
for start in range(0, n, n_batch):
    chunk = tokens[start:start + n_batch]
    array = (llama_cpp.llama_token * len(chunk))(*chunk)
    if llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(array, len(chunk))) != 0:
        sys.exit("decode failed")
notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
notify.sendto(b"READY=1", os.environ["NOTIFY_SOCKET"])
with open("/proc/self/status") as status:
    for line in status:
        if line.startswith("VmHWM:"):
            print("tokens", n, "VmHWM", line.split()[1], flush=True)
"""
