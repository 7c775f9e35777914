"""`crankllm bench`: what crankllm adds to the cost of a token, against llama.cpp alone.

Every figure is a ratio against a reference measured in the same run, so the result
carries over between machines better than absolute times do:

- decode step: ms per detent through the whole daemon path ÷ a bare llama.cpp
  sample-and-decode loop on the same model, context, threads and sampler chain;
- prefill: Engine.prime ÷ a bare batch decode of the same tokens;
- start to ready: `crankllm run` to READY=1 ÷ a bare process that loads the model
  and decodes the prompt;
- idle: CPU time of the running daemon at rest ÷ wall time;
- memory: the daemon's peak RSS ÷ (model file + KV cache);
- display traffic: SSD1306 bytes per token ÷ one full frame;
- backlog: RSS after a flood of detents ÷ RSS before it, with the detent accounting;
- CPU per token: the energy proxy, daemon ÷ bare loop.

``run()`` returns the result as a dict (and writes it as JSON); ``format_table()``
prints it. docs/benchmarks.md explains each figure and records a run.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from datetime import datetime, timezone

from appliance.bench import figures
from appliance.bench.bare import BareLlama, Sampling
from appliance.bench.errors import BenchError
from appliance.bench.inprocess import Rig, measure_backlog, measure_decode, measure_display, measure_prefill, \
    quiet_daemon_logs
from appliance.bench.machine import describe_machine, describe_model, kv_cache_bytes
from appliance.bench.plan import FULL, QUICK, Plan
from appliance.bench.processes import ReferenceStart, measure_processes
from appliance.bench.runconfig import write_config
from appliance.bench.table import format_table
from appliance.config import load_config
from appliance.engine.engine import default_threads, use_extra_buffer_types
from appliance.engine.gguf import read_gguf

__all__ = ["run", "main", "format_table", "BenchError", "Plan", "FULL", "QUICK", "FORMAT"]

log = logging.getLogger(__name__)

FORMAT = "crankllm-bench 1"
# Read size for pulling the model file into the page cache before the first phase.
_READ_CHUNK = 1 << 20


def _warm_page_cache(path: str) -> None:
    # Both sides of every phase then read the model from memory, not from the disk,
    # so the first process started does not pay for the disk alone.
    with open(path, "rb") as file:
        while file.read(_READ_CHUNK):
            pass


def _resolve_model(model: str | os.PathLike | None) -> str:
    if model:
        return os.path.abspath(os.fspath(model))
    from appliance import models

    return str(models.ensure_default_model())


def _sampling(model_config) -> Sampling:
    return Sampling(seed=model_config.seed, temperature=model_config.temperature, top_k=model_config.top_k,
                    top_p=model_config.top_p, min_p=model_config.min_p,
                    repeat_penalty=model_config.repeat_penalty, repeat_last_n=model_config.repeat_last_n)


def _settings(config, engine, prompt: str, extra_bufts: bool) -> dict:
    m = config.model
    return {
        "n_ctx": engine.n_ctx,
        "n_threads": engine.n_threads,
        "n_batch": m.n_batch,
        "prompt_format": m.prompt_format,
        "prompt": prompt,
        "sampler": {"temperature": m.temperature, "top_k": m.top_k, "top_p": m.top_p, "min_p": m.min_p,
                    "repeat_penalty": m.repeat_penalty, "repeat_last_n": m.repeat_last_n, "seed": m.seed},
        "context_policy": m.context_policy,
        "end_policy": m.end_policy,
        "extra_buffer_types": m.extra_buffer_types,
        "extra_buffer_types_used": extra_bufts,
        "fps_max": config.display.fps_max,
        "max_backlog": config.crank.max_backlog,
        "display": f"{config.display.driver} over the fake bus, {config.display.width}x{config.display.height}",
    }


def run(model: str | os.PathLike | None = None, json_path: str | os.PathLike | None = None, *,
        quick: bool = False, threads: int | None = None, plan: Plan | None = None) -> dict:
    """Run every benchmark phase and return the result; write it as JSON to ``json_path`` if given.

    ``model`` defaults to the prepared default model (prepared if missing). ``threads``
    defaults to what the appliance uses, every CPU this process may run on. ``plan``
    overrides the phase lengths that ``quick`` selects. Raises BenchError when a phase
    cannot run, and the config, model and engine errors of the parts it starts.
    """
    plan = plan or (QUICK if quick else FULL)
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"invalid threads {threads!r}: expected a positive integer")
    started_at = datetime.now(timezone.utc)
    started = time.monotonic()
    model_path = _resolve_model(model)
    info = read_gguf(model_path)
    n_threads = threads or default_threads()
    prompt_format = "chat" if "tokenizer.chat_template" in info.metadata else "raw"
    load_start = os.getloadavg()

    with tempfile.TemporaryDirectory(prefix="crankllm-bench-") as workdir:
        run_config = write_config(workdir, model_path=model_path, n_threads=n_threads, prompt_format=prompt_format)
        config = load_config(run_config.path)
        prompt = config.all_prompts[0]
        _warm_page_cache(model_path)
        log.info("benchmark of %s with %d threads (%s plan), working in %s",
                 model_path, n_threads, "quick" if quick else "full", workdir)

        with quiet_daemon_logs():
            extra_bufts = use_extra_buffer_types(config.model.extra_buffer_types)
            # The rig's engine installs crankllm's llama.cpp log callback, so it starts
            # before the bare reference loads, which would otherwise log to stderr.
            rig = Rig(config)
            try:
                settings = _settings(config, rig.engine, prompt, extra_bufts)
                bare = BareLlama(model_path, n_ctx=config.model.n_ctx, n_batch=config.model.n_batch,
                                 n_threads=n_threads, use_extra_bufts=extra_bufts, sampling=_sampling(config.model))
                with bare:
                    decode = measure_decode(rig, bare, plan)
                    prefill = measure_prefill(config, model_path, bare, prompt, plan)
                backlog = measure_backlog(rig, plan)
                display = measure_display(rig, plan)
            finally:
                rig.close()

        reference = ReferenceStart(
            model_path=model_path, n_ctx=config.model.n_ctx, n_batch=config.model.n_batch, n_threads=n_threads,
            use_extra_bufts=extra_bufts, prompt_text=prefill["prompt_text"], special=prefill["special"],
        )
        processes = measure_processes(run_config.path, reference, workdir, plan)

    kv_bytes = kv_cache_bytes(info, settings["n_ctx"])
    machine = describe_machine()
    machine["loadavg_start"] = list(load_start)
    machine["loadavg_end"] = list(os.getloadavg())
    result = {
        "format": FORMAT,
        "started_at": started_at.isoformat(timespec="seconds"),
        "duration_s": time.monotonic() - started,
        "quick": quick,
        "plan": plan.as_dict(),
        "machine": machine,
        "model": describe_model(info) | {"kv_cache_bytes": kv_bytes},
        "settings": settings,
        "figures": {
            "decode_step": figures.decode_step(decode),
            "prefill": figures.prefill(prefill),
            "start_to_ready": figures.start_to_ready(processes),
            "idle": figures.idle(processes),
            "memory": figures.memory(processes, model_bytes=info.file_size, kv_bytes=kv_bytes),
            "display_traffic": figures.display_traffic(display),
            "backlog": figures.backlog(backlog),
            "energy": figures.energy(decode),
        },
    }
    if json_path:
        _write_json(result, os.fspath(json_path))
    return result


def _write_json(result: dict, path: str) -> None:
    temporary = f"{path}.tmp"
    with open(temporary, "w", encoding="utf-8") as file:
        json.dump(result, file, indent=2, allow_nan=False)
        file.write("\n")
    os.replace(temporary, path)
    log.info("benchmark result written to %s", path)


def main(args) -> int:
    """Run the benchmark for `crankllm bench` and print the table; return the exit code.

    ``args`` carries ``model`` (path or None), ``json`` (path or None), ``quick``
    (bool) and optionally ``threads`` (int or None).
    """
    result = run(model=args.model, json_path=args.json, quick=args.quick, threads=getattr(args, "threads", None))
    print(format_table(result))
    return 0
