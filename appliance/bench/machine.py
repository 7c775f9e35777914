"""Descriptions of the machine (CPU, cores, memory, Python, llama.cpp build) and of the model."""

from __future__ import annotations

import os
import platform

import llama_cpp

from appliance import __version__
from appliance.engine.gguf import GGUFInfo

F16_BYTES = 2


def _cpuinfo_field(*names: str) -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as file:
            for line in file:
                key, _, value = line.partition(":")
                if key.strip() in names and value.strip():
                    return value.strip()
    except OSError:
        return None
    return None


def _board_model() -> str | None:
    # Raspberry Pi kernels name the board in the device tree ("Raspberry Pi 4 Model B
    # Rev 1.4"); its string ends with a NUL byte.
    try:
        with open("/proc/device-tree/model", "rb") as file:
            return file.read().rstrip(b"\0").decode("utf-8", errors="replace") or None
    except OSError:
        return None


def _mem_total_bytes() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii", errors="replace") as file:
            for line in file:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def describe_machine() -> dict:
    """Return the CPU, cores, memory, OS, Python and llama.cpp build of this machine."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        # x86 names the CPU in "model name"; ARM kernels give "Model" (the board) or nothing.
        "cpu": _cpuinfo_field("model name", "Model", "Hardware") or platform.processor() or "unknown",
        "board": _board_model(),
        "architecture": platform.machine(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "memory_bytes": _mem_total_bytes(),
        "kernel": platform.release(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "llama_cpp_python": llama_cpp.__version__,
        "llama_system_info": llama_cpp.llama_print_system_info().decode("utf-8", errors="replace").strip(),
        "crankllm": __version__,
    }


def kv_cache_bytes(info: GGUFInfo, n_ctx: int) -> int:
    """Return the F16 KV cache size: n_layer × n_ctx × n_head_kv × head_dim × 2 (K and V) × 2 bytes.

    head_dim is ``attention.key_length`` when the file declares it, else
    embedding_length / head_count, as llama.cpp derives it.
    """
    arch = info.architecture
    meta = info.metadata
    n_layer = int(meta[f"{arch}.block_count"])
    n_head = int(meta[f"{arch}.attention.head_count"])
    n_head_kv = int(meta.get(f"{arch}.attention.head_count_kv", n_head))
    head_dim = int(meta.get(f"{arch}.attention.key_length", int(meta[f"{arch}.embedding_length"]) // n_head))
    return n_layer * n_ctx * n_head_kv * head_dim * 2 * F16_BYTES


def describe_model(info: GGUFInfo) -> dict:
    """Return the model file's size, type, parameter count, bits per weight and shape."""
    arch = info.architecture
    meta = info.metadata
    fallen, matrices, fallen_types = info.fallbacks()
    return {
        "path": info.path,
        "name": info.name,
        "architecture": arch,
        "file_size": info.file_size,
        "file_type": info.file_type,
        "n_params": info.n_params,
        "bits_per_weight": round(info.bits_per_weight, 3),
        "tensor_types": dict(info.type_counts),
        "matrices_fallen_back": {"count": fallen, "of": matrices, "types": dict(fallen_types)},
        "n_layer": meta.get(f"{arch}.block_count"),
        "n_embd": meta.get(f"{arch}.embedding_length"),
        "n_head": meta.get(f"{arch}.attention.head_count"),
        "n_head_kv": meta.get(f"{arch}.attention.head_count_kv"),
        "has_chat_template": "tokenizer.chat_template" in meta,
    }
