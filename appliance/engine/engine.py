"""The decode engine: one llama.cpp decode step per call.

The engine owns one llama.cpp model, context and sampler chain through the low-level
API. The high-level ``Llama`` class is not used because it allocates an
n_batch × n_vocab float array for logits (about 100 MB for a 49k vocabulary), which a
Pi Zero 2 W with 512 MB cannot spare.

Positions in the KV cache: the prompt occupies [0, n_prompt), then the generated tokens
that are still cached follow. After a context shift the oldest generated tokens leave
the cache but stay in the story's text, so ``_kv_first`` counts the generated tokens no
longer cached. Every method must be called from the one thread that owns the engine.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import llama_cpp

from appliance.engine import llama_log, sampler
from appliance.engine.gguf import GGUFInfo, read_gguf
from appliance.engine.text import TokenText
from appliance.errors import EngineError, ModelError

log = logging.getLogger(__name__)

PROMPT_FORMATS = ("chat", "raw")
CONTEXT_POLICIES = ("shift", "restart", "stop")
END_POLICIES = ("stop", "restart")

# Room a prompt must leave in the context for generated tokens.
MIN_GENERATION_ROOM = 8


@dataclass(frozen=True)
class EngineSettings:
    """Context, sampling and policy settings, as in the [model] config section."""

    n_ctx: int = 512
    n_threads: int = 0
    n_batch: int = 64
    prompt_format: str = "chat"
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.1
    repeat_last_n: int = 64
    seed: int | str = "random"
    context_policy: str = "shift"
    end_policy: str = "stop"
    extra_buffer_types: bool | str = "auto"

    def __post_init__(self):
        if self.prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"invalid prompt_format {self.prompt_format!r}: expected chat or raw")
        if self.context_policy not in CONTEXT_POLICIES:
            raise ValueError(
                f"invalid context_policy {self.context_policy!r}: expected shift, restart or stop"
            )
        if self.end_policy not in END_POLICIES:
            raise ValueError(f"invalid end_policy {self.end_policy!r}: expected stop or restart")
        if self.n_ctx < 16:
            raise ValueError(f"invalid n_ctx {self.n_ctx}: expected at least 16")
        if self.n_batch < 1 or self.n_threads < 0:
            raise ValueError(f"invalid n_batch {self.n_batch} or n_threads {self.n_threads}")
        if self.extra_buffer_types not in ("auto", True, False):
            raise ValueError(
                f"invalid extra_buffer_types {self.extra_buffer_types!r}: expected auto, true or false"
            )


@dataclass(frozen=True)
class StepResult:
    """The outcome of one step.

    ``event`` is None for an ordinary token. "end" means nothing was decoded because the
    model ended the text, or the context is full under the "stop" policy. "shifted"
    means the oldest generated tokens left the context first. "restarted" means the
    engine primed the prompt again and ``text`` starts a new story.
    """

    token: int | None
    text: str
    event: str | None
    ms: float


class PromptTooLongError(EngineError, ValueError):
    """A prompt that leaves no room in the context for generated text."""

    exit_code = 1


def default_threads() -> int:
    """Return the number of CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def use_extra_buffer_types(setting: bool | str) -> bool:
    """Decide whether llama.cpp may place weights in its extra buffer types.

    The extra buffer types carry the repacked matrix layouts: on ARM (every Raspberry
    Pi) the fast Q4_0/IQ4_NL kernels, on x86 the AVX2 repack and, when the build
    found AMX, the AMX tile kernels. With llama-cpp-python 0.3.36 built by pip on a
    CPU that has AMX, the first decode of a K-quant model dies with SIGSEGV in the AMX
    matrix multiply. "auto" therefore turns the extra buffer types off only when this
    llama.cpp build reports AMX_INT8 = 1, so ARM boards keep their repacked kernels.
    """
    if setting != "auto":
        return bool(setting)
    info = llama_cpp.llama_print_system_info().decode("utf-8", errors="replace")
    if "AMX_INT8 = 1" in info:
        log.info(
            "extra buffer types disabled: this llama.cpp build uses AMX, whose repacked "
            "decode crashes; [model] extra_buffer_types = true overrides this"
        )
        return False
    return True


_backend_ready = False


def _init_backend() -> None:
    global _backend_ready
    if not _backend_ready:
        llama_log.install()
        llama_cpp.llama_backend_init()
        _backend_ready = True


class Engine:
    """One model, one context, one sampler: prime a prompt, then one token per step()."""

    def __init__(self, model_path: str | os.PathLike, settings: EngineSettings | None = None):
        self.settings = settings or EngineSettings()
        self.model_path = os.fspath(model_path)
        # Checked here so a malformed file is reported, because llama.cpp's loader
        # aborts the process on some of them.
        self.model_info: GGUFInfo = read_gguf(self.model_path)
        self.seed = sampler.resolve_seed(self.settings.seed)
        self.n_threads = self.settings.n_threads or default_threads()
        _init_backend()

        self._resources = contextlib.ExitStack()
        try:
            self._load()
        except BaseException:
            self._resources.close()
            raise

        self.prompt = ""
        self.prompt_tokens: list[int] = []
        self.tokens: list[int] = []
        self.story = TokenText()
        self._kv_first = 0
        self.ended = False
        self._single_token = (llama_cpp.llama_token * 1)()
        self._piece = ctypes.create_string_buffer(256)

    def _load(self) -> None:
        started = time.perf_counter()
        model_params = llama_cpp.llama_model_default_params()
        model_params.use_extra_bufts = use_extra_buffer_types(self.settings.extra_buffer_types)
        self.model = llama_cpp.llama_model_load_from_file(self.model_path.encode(), model_params)
        if not self.model:
            raise ModelError(
                f"llama.cpp could not load {self.model_path} (see the llama.cpp log lines "
                "above at debug level); check the file or prepare it again"
            )
        self._resources.callback(llama_cpp.llama_model_free, self.model)
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)

        context_params = llama_cpp.llama_context_default_params()
        context_params.n_ctx = self.settings.n_ctx
        context_params.n_batch = self.settings.n_batch
        context_params.n_ubatch = self.settings.n_batch
        context_params.n_seq_max = 1
        context_params.n_threads = self.n_threads
        context_params.n_threads_batch = self.n_threads
        context_params.no_perf = True
        self.ctx = llama_cpp.llama_init_from_model(self.model, context_params)
        if not self.ctx:
            raise ModelError(
                f"llama.cpp could not create a context of {self.settings.n_ctx} tokens for "
                f"{self.model_path}; lower [model] n_ctx"
            )
        # Freed before the model because the context refers to it.
        self._resources.callback(llama_cpp.llama_free, self.ctx)
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        # llama.cpp may round the context up (to a multiple of 256 in 0.3.36). The
        # configured size stays the limit, so a policy triggers where the user set it.
        self.n_ctx = min(llama_cpp.llama_n_ctx(self.ctx), self.settings.n_ctx)

        s = self.settings
        self.sampler = sampler.build_chain(
            n_vocab=llama_cpp.llama_vocab_n_tokens(self.vocab),
            seed=self.seed,
            temperature=s.temperature,
            top_k=s.top_k,
            top_p=s.top_p,
            min_p=s.min_p,
            repeat_penalty=s.repeat_penalty,
            repeat_last_n=s.repeat_last_n,
        )
        self._resources.callback(llama_cpp.llama_sampler_free, self.sampler)
        self.load_ms = (time.perf_counter() - started) * 1000
        log.debug("engine loaded %s in %.0f ms", self.model_path, self.load_ms)

    # -- lifecycle -------------------------------------------------------------------

    def close(self) -> None:
        """Free the sampler, context and model, in that order; idempotent."""
        self._resources.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    # -- state -----------------------------------------------------------------------

    @property
    def text(self) -> str:
        """The story's text so far, the prompt excluded."""
        return self.story.text

    @property
    def n_generated(self) -> int:
        return len(self.tokens)

    @property
    def n_past(self) -> int:
        """Tokens in the KV cache: the prompt and the cached generated tokens."""
        return len(self.prompt_tokens) + len(self.tokens) - self._kv_first

    # -- tokens ----------------------------------------------------------------------

    def tokenize(self, text: str, *, special: bool) -> list[int]:
        data = text.encode("utf-8")
        capacity = len(data) + 16
        buffer = (llama_cpp.llama_token * capacity)()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buffer, capacity, True, special)
        if n < 0:
            capacity = -n
            buffer = (llama_cpp.llama_token * capacity)()
            n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buffer, capacity, True, special)
        if n < 0:
            raise EngineError(f"llama.cpp could not tokenize a prompt of {len(data)} bytes")
        return list(buffer[:n])

    def piece(self, token: int) -> bytes:
        n = llama_cpp.llama_token_to_piece(self.vocab, token, self._piece, len(self._piece), 0, False)
        if n < 0:
            self._piece = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, self._piece, len(self._piece), 0, False)
        return self._piece.raw[:n]

    def detokenize(self, tokens: list[int]) -> str:
        """Return the text of ``tokens`` decoded at once (special tokens not rendered)."""
        if not tokens:
            return ""
        array = (llama_cpp.llama_token * len(tokens))(*tokens)
        capacity = len(tokens) * 16 + 16
        out = ctypes.create_string_buffer(capacity)
        n = llama_cpp.llama_detokenize(self.vocab, array, len(tokens), out, capacity, False, False)
        if n < 0:
            out = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_detokenize(self.vocab, array, len(tokens), out, -n, False, False)
        return out.raw[:n].decode("utf-8", errors="replace")

    def format_prompt(self, prompt: str) -> tuple[str, bool]:
        """Return the text to tokenize and whether it contains special tokens."""
        if self.settings.prompt_format == "raw":
            return prompt, False
        template = llama_cpp.llama_model_chat_template(self.model, None)
        if not template:
            raise ModelError(
                f"{self.model_path} has no chat template; set [model] prompt_format = \"raw\""
            )
        message = (llama_cpp.llama_chat_message * 1)()
        role, content = b"user", prompt.encode("utf-8")
        message[0].role = role
        message[0].content = content
        size = len(content) * 2 + 512
        buffer = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_chat_apply_template(template, message, 1, True, buffer, size)
        if n > size:
            buffer = ctypes.create_string_buffer(n)
            n = llama_cpp.llama_chat_apply_template(template, message, 1, True, buffer, n)
        if n < 0:
            raise ModelError(
                f"llama.cpp cannot apply the chat template of {self.model_path}; "
                "set [model] prompt_format = \"raw\""
            )
        return buffer.raw[:n].decode("utf-8", errors="replace"), True

    # -- decoding --------------------------------------------------------------------

    def _decode(self, tokens: list[int]) -> None:
        """Decode ``tokens`` after the cached ones, in batches of at most n_batch."""
        n_batch = self.settings.n_batch
        for start in range(0, len(tokens), n_batch):
            chunk = tokens[start:start + n_batch]
            array = (llama_cpp.llama_token * len(chunk))(*chunk)
            self._check(llama_cpp.llama_decode(self.ctx, llama_cpp.llama_batch_get_one(array, len(chunk))))

    def _decode_one(self, token: int) -> None:
        self._single_token[0] = token
        self._check(llama_cpp.llama_decode(self.ctx, llama_cpp.llama_batch_get_one(self._single_token, 1)))

    def _check(self, rc: int) -> None:
        if rc != 0:
            # 1 = no KV slot for the batch, 2 = aborted, negative = error (llama.h).
            raise EngineError(
                f"llama_decode failed with code {rc} at position {self.n_past} of {self.n_ctx}"
            )

    def prime(self, prompt: str) -> float:
        """Start a new story from ``prompt``: clear the context and prefill the prompt.

        Returns the prefill time in milliseconds. Raises PromptTooLongError when the
        prompt leaves fewer than MIN_GENERATION_ROOM tokens of context.
        """
        text, special = self.format_prompt(prompt)
        tokens = self.tokenize(text, special=special)
        if len(tokens) > self.n_ctx - MIN_GENERATION_ROOM:
            raise PromptTooLongError(
                f"prompt is {len(tokens)} tokens but the context has room for {self.n_ctx}; "
                "shorten the prompt or raise [model] n_ctx"
            )
        if not tokens:
            raise PromptTooLongError("prompt is empty after tokenizing; give it some text")
        started = time.perf_counter()
        llama_cpp.llama_memory_clear(self.memory, True)
        self.prompt = prompt
        self.prompt_tokens = tokens
        self.tokens = []
        self.story.clear()
        self._kv_first = 0
        self.ended = False
        sampler.reset_penalties(self.sampler, [])
        self._decode(tokens)
        return (time.perf_counter() - started) * 1000

    def _restart(self) -> None:
        self.prime(self.prompt)

    def _shift(self) -> bool:
        """Drop the oldest half of the cached generated tokens; False if impossible."""
        cached = len(self.tokens) - self._kv_first
        if cached < 2 or not llama_cpp.llama_memory_can_shift(self.memory):
            return False
        n_prompt = len(self.prompt_tokens)
        n_discard = cached // 2
        end = self.n_past
        llama_cpp.llama_memory_seq_rm(self.memory, 0, n_prompt, n_prompt + n_discard)
        llama_cpp.llama_memory_seq_add(self.memory, 0, n_prompt + n_discard, end, -n_discard)
        self._kv_first += n_discard
        log.debug("context shift: dropped %d generated tokens from the KV cache", n_discard)
        return True

    def step(self) -> StepResult:
        """Sample one token and decode it: exactly one llama_decode of one token.

        Never raises for a full context or an end of text: those follow the configured
        policies and show in ``StepResult.event``. Raises EngineError when llama.cpp
        fails to decode.
        """
        if not self.prompt_tokens:
            raise EngineError("step() before prime(): no prompt in the context")
        started = time.perf_counter()
        if self.ended:
            return StepResult(None, "", "end", 0.0)

        event = None
        if self.n_past >= self.n_ctx:
            policy = self.settings.context_policy
            if policy == "shift" and self._shift():
                event = "shifted"
            elif policy == "stop":
                self.ended = True
                return StepResult(None, "", "end", (time.perf_counter() - started) * 1000)
            else:
                if policy == "shift":
                    log.info("context full and llama.cpp cannot shift this memory: restarting")
                self._restart()
                event = "restarted"

        token = llama_cpp.llama_sampler_sample(self.sampler, self.ctx, -1)
        if llama_cpp.llama_vocab_is_eog(self.vocab, token):
            if self.settings.end_policy == "stop":
                self.ended = True
                return StepResult(token, "", "end", (time.perf_counter() - started) * 1000)
            self._restart()
            event = "restarted"
            token = llama_cpp.llama_sampler_sample(self.sampler, self.ctx, -1)

        self._decode_one(token)
        self.tokens.append(token)
        added = self.story.append(self.piece(token))
        return StepResult(token, added, event, (time.perf_counter() - started) * 1000)

    def steps(self) -> Iterator[StepResult]:
        """Yield one StepResult per next(): one decode step each."""
        while True:
            yield self.step()

    def rewind(self, n: int) -> str:
        """Un-generate the last ``n`` tokens and return the text that disappeared.

        Stops at the start of the generated text, or at the oldest token still in the
        KV cache after a context shift, without error. Costs one decode of the new last
        token, whose logits the next step samples from.
        """
        if n <= 0 or not self.prompt_tokens:
            return ""
        n = min(n, len(self.tokens) - self._kv_first)
        if n == 0:
            return ""
        keep = len(self.tokens) - n
        # The new last token is removed too and decoded again, because llama.cpp keeps
        # logits only for the last decoded batch.
        position = self.n_past - n - 1
        llama_cpp.llama_memory_seq_rm(self.memory, 0, position, -1)
        if keep > self._kv_first:
            last = self.tokens[keep - 1]
        else:
            last = self.prompt_tokens[-1]
        del self.tokens[keep:]
        removed = self.story.truncate(keep)
        self._decode_one(last)
        window = self.settings.repeat_last_n
        sampler.reset_penalties(self.sampler, self.tokens[-window:] if window else [])
        self.ended = False
        return removed
