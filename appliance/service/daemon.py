"""The daemon loop: one worker thread owns the engine and consumes crank events.

Data flows one way. Crank callbacks, the control socket, the serial console and
signals only put events into the CrankQueue. The worker takes them one at a time, runs
the engine, and hands the results to the display, the transcript and the mirrors (the
serial console and control-socket followers). Nothing downstream calls back upstream.

The worker is also the only thread that pings the systemd watchdog, so a decode that
hangs stops the pings and systemd restarts the service.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

from appliance import __version__, models
from appliance.crank.events import CrankQueue, Press, Rewind, Step
from appliance.display.state import DisplayState
from appliance.engine.engine import Engine, EngineSettings, PromptTooLongError
from appliance.errors import ConfigError, CrankError, EngineError, ModelError
from appliance.service.notify import Notifier
from appliance.service.transcript import TranscriptWriter

log = logging.getLogger(__name__)

# systemd's start timeout is extended by this much before each slow start phase
# (model load, warm-up decode), so a slow SD card does not fail the start.
START_EXTENSION_USEC = 120_000_000
# Tokens per second are averaged over this window for the status line.
RATE_WINDOW_S = 5.0
# STATUS= is sent at most this often while cranking; systemctl status shows it.
STATUS_INTERVAL_S = 1.0
# How long a passing message ("display back", "model error") stays on screen.
FLASH_S = 5.0


# -- events the worker understands besides the crank's Step, Rewind and Press -----------


@dataclass(frozen=True)
class PromptRequest:
    """Start a new story from ``text`` (from the control socket or serial console)."""

    text: str


@dataclass(frozen=True)
class NewStory:
    """Close the current story and start it again from the same prompt."""


@dataclass(frozen=True)
class Reload:
    """Re-read the configuration (SIGHUP)."""


@dataclass(frozen=True)
class Stop:
    """Finish the current step, flush everything and leave the loop."""


@dataclass(frozen=True)
class Sync:
    """Set ``done`` once every event queued before this one has been handled."""

    done: threading.Event = field(default_factory=threading.Event, compare=False)


class Mirror(Protocol):
    """Something that follows the story: the serial console, control-socket followers."""

    def story_started(self, story_id: int, prompt: str) -> None: ...

    def text_added(self, text: str) -> None: ...

    def text_removed(self, text: str) -> None: ...

    def story_ended(self, reason: str) -> None: ...


@dataclass
class Stats:
    """Counters of this run, read by the status line, `crankllm status` and the summary."""

    story_id: int = 0
    steps: int = 0
    # Steps asked for after the story ended (end of text, or a full context under the
    # "stop" policy): the detent was consumed but no token was made.
    steps_after_end: int = 0
    tokens: int = 0
    rewound_tokens: int = 0
    decode_ms_total: float = 0.0
    last_step_ms: float = 0.0
    prefill_ms: float = 0.0
    load_ms: float = 0.0
    state: str = "starting"


def engine_settings(model_config) -> EngineSettings:
    """Map the [model] section onto the engine's settings."""
    return EngineSettings(
        n_ctx=model_config.n_ctx,
        n_threads=model_config.n_threads,
        n_batch=model_config.n_batch,
        prompt_format=model_config.prompt_format,
        temperature=model_config.temperature,
        top_k=model_config.top_k,
        top_p=model_config.top_p,
        min_p=model_config.min_p,
        repeat_penalty=model_config.repeat_penalty,
        repeat_last_n=model_config.repeat_last_n,
        seed=model_config.seed,
        context_policy=model_config.context_policy,
        end_policy=model_config.end_policy,
        extra_buffer_types=model_config.extra_buffer_types,
    )


def resolve_model_path(model_config, *, prepare_missing: bool) -> str:
    """Return the configured model, or the default prepared one ("" in the config)."""
    if model_config.path:
        return model_config.path
    if prepare_missing:
        return str(models.ensure_default_model())
    path = models.default_model_path()
    if not path.exists():
        raise ModelError(
            f"default model not found at {path}; run `crankllm model prepare --system` "
            "or set [model] path in /etc/crankllm/crankllm.toml"
        )
    return str(path)


class Daemon:
    """The appliance's running state: engine, crank inbox, display, transcript and mirrors.

    ``start()`` starts the worker and returns once the model is loaded and the first
    prompt primed (the warm-up decode), or raises what made the start fail.
    """

    def __init__(
        self,
        config,
        *,
        queue: CrankQueue,
        display=None,
        notifier: Notifier | None = None,
        transcripts: TranscriptWriter | None = None,
        mirrors: list[Mirror] | None = None,
        prepare_missing_model: bool = False,
        config_loader=None,
        clock=time.monotonic,
    ):
        self.config = config
        self.queue = queue
        self.display = display
        self.notifier = notifier or Notifier()
        self.transcripts = transcripts
        self.mirrors = list(mirrors or [])
        self.prepare_missing_model = prepare_missing_model
        self.config_loader = config_loader
        self.clock = clock

        self.stats = Stats()
        self.engine: Engine | None = None
        self.model_path = ""
        self.prompts: tuple[str, ...] = tuple(config.all_prompts)
        self.prompt_index = 0
        self.message = ""
        self._flash_text = ""
        self._flash_until = 0.0
        self._display_reconnects = 0
        self._step_times: collections.deque[float] = collections.deque()
        self._last_watchdog = 0.0
        self._last_status = 0.0
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.exit_error: BaseException | None = None

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="crankllm-engine", daemon=True)
        self._thread.start()
        self._started.wait()
        if self._start_error is not None:
            self._thread.join()
            raise self._start_error

    def post(self, event: object) -> None:
        self.queue.put_event(event)

    def stop(self) -> None:
        self.queue.put_event(Stop())

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def sync(self, timeout: float | None = None) -> bool:
        """Wait until every event queued so far has been handled."""
        marker = Sync()
        self.queue.put_event(marker)
        return marker.done.wait(timeout)

    # -- the worker ------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._load()
        except BaseException as err:  # reported to start()'s caller, which re-raises it
            self._start_error = err
            self._shutdown("start failed")
            self._started.set()
            return
        self._started.set()
        try:
            self._loop()
        except BaseException as err:
            log.exception("engine loop failed: %s", err)
            self.exit_error = err
        finally:
            self._shutdown("stop")

    def _load(self) -> None:
        model_config = self.config.model
        self._show(message="loading model")
        self.notifier.status("loading model")
        self.notifier.extend_timeout(START_EXTENSION_USEC)
        self.model_path = resolve_model_path(model_config, prepare_missing=self.prepare_missing_model)
        self.engine = Engine(self.model_path, engine_settings(model_config))
        info = self.engine.model_info
        self.stats.load_ms = self.engine.load_ms
        log.info(
            "model loaded: %s (%.1f MiB, %.2f bits per weight, %s) in %.0f ms, seed %d",
            self.model_path, info.file_size / 2**20, info.bits_per_weight,
            info.file_type or "unknown type", self.engine.load_ms, self.engine.seed,
        )
        self.notifier.extend_timeout(START_EXTENSION_USEC)
        self._start_story(self.prompts[0])
        self.stats.state = "ready"
        # Logged before READY=1 so the journal shows it before systemd's "Started" line.
        log.info("ready: crank to generate (model %s)", os.path.basename(self.model_path))
        self.notifier.ready(self._status_line())

    def _loop(self) -> None:
        while True:
            event = self.queue.get(timeout=self._ping_watchdog())
            if event is None:
                if self.queue.closed:
                    return
                continue
            if isinstance(event, Stop):
                log.info("stop requested")
                return
            self._handle(event)

    def _handle(self, event: object) -> None:
        if isinstance(event, Step):
            self._activity()
            for _ in range(event.tokens):
                self._step()
                self._ping_watchdog()
        elif isinstance(event, Rewind):
            self._activity()
            self._rewind(event.tokens)
        elif isinstance(event, Press):
            self._activity()
            if event.long:
                log.info("long press: new story")
                self._new_story(self.engine.prompt or self.prompts[self.prompt_index])
            else:
                self.prompt_index = (self.prompt_index + 1) % len(self.prompts)
                log.info("short press: prompt %d of %d", self.prompt_index + 1, len(self.prompts))
                self._new_story(self.prompts[self.prompt_index])
        elif isinstance(event, PromptRequest):
            log.info("new prompt received (%d characters)", len(event.text))
            self._new_story(event.text)
        elif isinstance(event, NewStory):
            self._new_story(self.engine.prompt or self.prompts[self.prompt_index])
        elif isinstance(event, Reload):
            self._reload()
        elif isinstance(event, Sync):
            event.done.set()
        else:
            log.warning("ignored unknown event %r", event)

    # -- stories ---------------------------------------------------------------------

    def _start_story(self, prompt: str) -> None:
        with self._lock:
            self.stats.story_id += 1
        self.message = ""
        rejected = False
        try:
            self.stats.prefill_ms = self.engine.prime(prompt)
        except PromptTooLongError as err:
            if prompt == self.prompts[0]:
                raise
            log.warning("prompt rejected: %s; using the first configured prompt", err)
            rejected = True
            prompt = self.prompts[0]
            self.stats.prefill_ms = self.engine.prime(prompt)
        self._step_times.clear()
        story_id = self.stats.story_id
        log.info(
            "story %d started: %d prompt tokens, prefill %.0f ms",
            story_id, len(self.engine.prompt_tokens), self.stats.prefill_ms,
            extra={"fields": {"STORY_ID": story_id}},
        )
        if self.transcripts is not None:
            self.transcripts.start_story(story_id, self._transcript_header(prompt))
        for mirror in self.mirrors:
            mirror.story_started(story_id, prompt)
        if rejected:
            self._flash("prompt too long")
        else:
            self._show()

    def _end_story(self, reason: str) -> None:
        if self.engine is None or not self.engine.prompt_tokens:
            return
        log.info(
            "story %d ended (%s) after %d tokens",
            self.stats.story_id, reason, self.engine.n_generated,
            extra={"fields": {"STORY_ID": self.stats.story_id}},
        )
        if self.transcripts is not None:
            self.transcripts.end_story(reason)
        for mirror in self.mirrors:
            mirror.story_ended(reason)

    def _new_story(self, prompt: str) -> None:
        self._end_story("new story")
        self._start_story(prompt)

    def _transcript_header(self, prompt: str) -> dict:
        m = self.config.model
        info = self.engine.model_info
        return {
            "model": self.model_path,
            "bits_per_weight": round(info.bits_per_weight, 2),
            "seed": self.engine.seed,
            "sampling": (
                f"temperature={m.temperature} top_k={m.top_k} top_p={m.top_p} "
                f"min_p={m.min_p} repeat_penalty={m.repeat_penalty} "
                f"repeat_last_n={m.repeat_last_n}"
            ),
            "n_ctx": m.n_ctx,
            "prompt": prompt,
            "crankllm": __version__,
        }

    # -- steps -----------------------------------------------------------------------

    def _step(self) -> None:
        engine = self.engine
        try:
            result = engine.step()
        except EngineError as err:
            log.error("decode failed: %s; restarting story %d", err, self.stats.story_id)
            self._new_story(engine.prompt)
            self._flash("model error")
            return

        if result.event == "end":
            self.stats.steps_after_end += 1
            if self.message != "the end":
                self.message = "the end"
                self._show()
            return
        if result.event == "restarted":
            # The engine primed the prompt again: the old story is complete.
            self._restart_story_records(engine.prompt)

        self.stats.steps += 1
        self.stats.tokens += 1
        self.stats.decode_ms_total += result.ms
        self.stats.last_step_ms = result.ms
        now = self.clock()
        self._step_times.append(now)
        # Checked first so the per-step record costs nothing at the default info level.
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "step %d: token %d in %.1f ms", engine.n_generated, result.token, result.ms,
                extra={"fields": {
                    "STORY_ID": self.stats.story_id,
                    "TOKEN_INDEX": engine.n_generated,
                    "DECODE_MS": f"{result.ms:.2f}",
                }},
            )

        if result.text:
            if self.transcripts is not None:
                self.transcripts.append(result.text)
            for mirror in self.mirrors:
                mirror.text_added(result.text)
        self._show()
        self._maybe_status(now)

    def _restart_story_records(self, prompt: str) -> None:
        reason = "context full" if self.engine.n_generated <= 1 else "end of text"
        if self.transcripts is not None:
            self.transcripts.end_story(reason)
        for mirror in self.mirrors:
            mirror.story_ended(reason)
        with self._lock:
            self.stats.story_id += 1
        if self.transcripts is not None:
            self.transcripts.start_story(self.stats.story_id, self._transcript_header(prompt))
        for mirror in self.mirrors:
            mirror.story_started(self.stats.story_id, prompt)
        log.info("story %d started after the engine restarted the prompt (%s)", self.stats.story_id, reason)

    def _rewind(self, n: int) -> None:
        before = self.engine.n_generated
        removed = self.engine.rewind(n)
        self.stats.rewound_tokens += before - self.engine.n_generated
        if self.message == "the end":
            self.message = ""
        if removed:
            if self.transcripts is not None:
                self.transcripts.rewind(removed)
            for mirror in self.mirrors:
                mirror.text_removed(removed)
        self._show()

    # -- outputs ---------------------------------------------------------------------

    def tokens_per_second(self, now: float | None = None) -> float:
        now = self.clock() if now is None else now
        times = self._step_times
        while times and now - times[0] > RATE_WINDOW_S:
            times.popleft()
        if len(times) < 2:
            return 0.0
        span = max(now - times[0], times[-1] - times[0])
        return (len(times) - 1) / span if span > 0 else 0.0

    def _flash(self, text: str) -> None:
        """Show ``text`` in the message row for FLASH_S seconds."""
        self._flash_text = text
        self._flash_until = self.clock() + FLASH_S
        self._show()

    def _current_message(self) -> str:
        if self._flash_text and self.clock() < self._flash_until:
            return self._flash_text
        self._flash_text = ""
        return self.message

    def _show(self, message: str | None = None) -> None:
        if self.display is None:
            return
        engine = self.engine
        self.display.update(
            DisplayState(
                text=engine.text if engine else "",
                tokens=engine.n_generated if engine else 0,
                ctx_used=engine.n_past if engine else 0,
                n_ctx=engine.n_ctx if engine else 0,
                tokens_per_s=self.tokens_per_second(),
                ms_per_step=self.stats.last_step_ms,
                message=self._current_message() if message is None else message,
            )
        )

    def _activity(self) -> None:
        """Wake the display for a crank event, and show "display back" after a reconnect."""
        if self.display is None:
            return
        self.display.activity()
        stats = getattr(self.display, "stats", None)
        if stats is not None and stats.reconnects > self._display_reconnects:
            self._display_reconnects = stats.reconnects
            log.info("display back after %d reconnects in total", stats.reconnects)
            self._flash("display back")

    def _status_line(self) -> str:
        tokens = self.engine.n_generated if self.engine else 0
        return f"{self.stats.state}: story {self.stats.story_id}, {tokens} tokens, {self.tokens_per_second():.1f} tok/s"

    def _maybe_status(self, now: float) -> None:
        if now - self._last_status >= STATUS_INTERVAL_S:
            self._last_status = now
            self.notifier.status(self._status_line())

    def _ping_watchdog(self) -> float | None:
        """Ping the watchdog if the interval has passed; return seconds until the next ping is due.

        Pings are at least WATCHDOG_USEC/2 apart (Notifier.watchdog_interval), and only
        this thread sends them, so they stop when a decode hangs. None means no watchdog.
        """
        interval = self.notifier.watchdog_interval
        if interval is None:
            return None
        now = self.clock()
        if now - self._last_watchdog >= interval:
            self._last_watchdog = now
            self.notifier.watchdog()
        return max(0.0, self._last_watchdog + interval - now)

    def snapshot(self) -> dict:
        """Return the daemon's state for `crankllm status` (safe from any thread)."""
        engine = self.engine
        counters = self.queue.counters()
        info = engine.model_info if engine else None
        return {
            "state": self.stats.state,
            "model": self.model_path,
            "bits_per_weight": round(info.bits_per_weight, 2) if info else None,
            "story_id": self.stats.story_id,
            "tokens": engine.n_generated if engine else 0,
            "ctx_used": engine.n_past if engine else 0,
            "n_ctx": engine.n_ctx if engine else 0,
            "tokens_per_s": round(self.tokens_per_second(), 2),
            "ms_per_step": round(self.stats.last_step_ms, 2),
            "steps_after_end": self.stats.steps_after_end,
            "detents": {
                name: getattr(counters, name)
                for name in ("received", "generated", "rewound", "cancelled", "dropped", "ignored", "pending")
            },
            "display": self._display_state(),
        }

    def _display_state(self) -> str:
        if self.display is None:
            return "none"
        stats = getattr(self.display, "stats", None)
        if stats is None:
            return "on"
        state = "connected" if stats.connected else "not responding (retrying)"
        return (
            f"{state}, {stats.frames_sent} frames, {stats.bytes_sent} bytes sent, "
            f"{stats.errors} errors, {stats.reconnects} reconnects"
        )

    # -- reload and shutdown ---------------------------------------------------------

    def _reload(self) -> None:
        if self.config_loader is None:
            log.info("reload requested, but this daemon has no config file to reload")
            return
        try:
            new = self.config_loader()
        except ConfigError as err:
            log.error("reload failed, keeping the running configuration: %s", err)
            return
        old_config = self.config
        old_model = {key: getattr(old_config.model, key) for key in old_config.model}
        new_model = {key: getattr(new.model, key) for key in new.model}
        self.config = new
        self.prompts = tuple(new.all_prompts)
        self.prompt_index = min(self.prompt_index, len(self.prompts) - 1)
        if old_model == new_model:
            log.info("configuration reloaded; model settings unchanged")
            return

        log.info("configuration reloaded; model settings changed: reloading the model")
        self._end_story("reload")
        old_engine = self.engine
        try:
            model_path = resolve_model_path(new.model, prepare_missing=self.prepare_missing_model)
            engine = Engine(model_path, engine_settings(new.model))
        except CrankError as err:
            log.error("new model settings failed (%s); keeping the running model", err)
            # The old model settings stay in force, so the next reload retries the new ones.
            self.config = old_config
            self._start_story(old_engine.prompt or self.prompts[0])
            return

        self.model_path = model_path
        self.engine = engine
        old_engine.close()
        self._start_story(self.prompts[self.prompt_index])

    def _shutdown(self, reason: str) -> None:
        self.stats.state = "stopping"
        self.notifier.stopping()
        try:
            self._end_story(reason)
        finally:
            if self.transcripts is not None:
                self.transcripts.close()
            if self.engine is not None:
                self.engine.close()
            log.info("stopped (%s)", reason)
