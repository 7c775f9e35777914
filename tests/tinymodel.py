"""Write a tiny llama-architecture GGUF with random weights, for tests without a download.

Every matrix row is 256 or 512 wide, a multiple of the 256-weight K-quant block, so
llama_model_quantize can store it as genuine Q2_K (unlike SmolLM2-135M, whose 576-wide
rows fall back to Q4_0). The vocabulary is a SentencePiece-style one: <unk>, <s>, </s>,
the 256 byte tokens and a few hundred word pieces, so random weights produce arbitrary
byte sequences, split UTF-8 characters included.
"""

from __future__ import annotations

import struct

import numpy as np

N_EMBD = 256
N_FF = 512
N_LAYER = 2
N_HEAD = 2
N_VOCAB = 512
ALIGNMENT = 32

_UINT32, _FLOAT32, _STRING, _ARRAY, _INT32 = 4, 6, 8, 9, 5


def _string(text: str) -> bytes:
    data = text.encode("utf-8")
    return struct.pack("<Q", len(data)) + data


def _kv(key: str, value) -> bytes:
    out = _string(key)
    if isinstance(value, str):
        return out + struct.pack("<I", _STRING) + _string(value)
    if isinstance(value, float):
        return out + struct.pack("<If", _FLOAT32, value)
    if isinstance(value, int):
        return out + struct.pack("<II", _UINT32, value)
    if isinstance(value, tuple):
        item_type, items = value
        out += struct.pack("<IIQ", _ARRAY, item_type, len(items))
        if item_type == _STRING:
            return out + b"".join(_string(item) for item in items)
        fmt = {_FLOAT32: "<f", _INT32: "<i"}[item_type]
        return out + b"".join(struct.pack(fmt, item) for item in items)
    raise TypeError(key)


def _vocabulary() -> tuple[list[str], list[float], list[int]]:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256  # UNKNOWN, CONTROL, CONTROL, BYTE
    words = (
        "the a an and of to in is was it he she they we you on at by for with crank "
        "light house keeper sea ship night story old new small box turn hand word "
        "time day lamp wind rain stone bell door road tree bird song ice fire café "
        "naïve über"
    ).split()
    pieces = []
    for word in words:
        pieces += ["▁" + word, word]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list(".,!?'") + ["▁"]
    for piece in pieces + letters:
        if len(tokens) >= N_VOCAB:
            break
        if piece not in tokens:
            tokens.append(piece)
            types.append(1)  # NORMAL
    index = 0
    while len(tokens) < N_VOCAB:
        tokens.append(f"▁w{index}")
        types.append(1)
        index += 1
    scores = [0.0] * 259 + [-float(i) / 100 for i in range(len(tokens) - 259)]
    return tokens, scores, types


def write_tiny_gguf(path, *, seed: int = 7) -> None:
    """Write an F32 GGUF of a 2-layer llama model with random weights to ``path``."""
    rng = np.random.default_rng(seed)
    tokens, scores, types = _vocabulary()
    metadata = [
        ("general.architecture", "llama"),
        ("general.name", "crankllm tiny test model"),
        ("general.file_type", 0),
        ("llama.context_length", 512),
        ("llama.embedding_length", N_EMBD),
        ("llama.block_count", N_LAYER),
        ("llama.feed_forward_length", N_FF),
        ("llama.attention.head_count", N_HEAD),
        ("llama.attention.head_count_kv", N_HEAD),
        ("llama.rope.dimension_count", N_EMBD // N_HEAD),
        ("llama.attention.layer_norm_rms_epsilon", 1e-5),
        ("tokenizer.ggml.model", "llama"),
        ("tokenizer.ggml.tokens", (_STRING, tokens)),
        ("tokenizer.ggml.scores", (_FLOAT32, scores)),
        ("tokenizer.ggml.token_type", (_INT32, types)),
        ("tokenizer.ggml.bos_token_id", 1),
        ("tokenizer.ggml.eos_token_id", 2),
        ("tokenizer.ggml.unknown_token_id", 0),
    ]
    # (name, shape as GGUF lists it: row width first)
    shapes = [("token_embd.weight", (N_EMBD, N_VOCAB)), ("output_norm.weight", (N_EMBD,)),
              ("output.weight", (N_EMBD, N_VOCAB))]
    for layer in range(N_LAYER):
        block = f"blk.{layer}."
        shapes += [
            (block + "attn_norm.weight", (N_EMBD,)),
            (block + "attn_q.weight", (N_EMBD, N_EMBD)),
            (block + "attn_k.weight", (N_EMBD, N_EMBD)),
            (block + "attn_v.weight", (N_EMBD, N_EMBD)),
            (block + "attn_output.weight", (N_EMBD, N_EMBD)),
            (block + "ffn_norm.weight", (N_EMBD,)),
            (block + "ffn_gate.weight", (N_EMBD, N_FF)),
            (block + "ffn_up.weight", (N_EMBD, N_FF)),
            (block + "ffn_down.weight", (N_FF, N_EMBD)),
        ]
    arrays = []
    for name, shape in shapes:
        if len(shape) == 1:
            arrays.append(np.ones(shape, dtype=np.float32))
        else:
            scale = 2.0 / np.sqrt(shape[0])
            arrays.append((rng.standard_normal(shape[::-1]) * scale).astype(np.float32))

    header = b"GGUF" + struct.pack("<IQQ", 3, len(shapes), len(metadata))
    header += b"".join(_kv(key, value) for key, value in metadata)
    offset = 0
    infos = b""
    for (name, shape), array in zip(shapes, arrays, strict=True):
        infos += _string(name) + struct.pack("<I", len(shape))
        infos += b"".join(struct.pack("<Q", d) for d in shape)
        infos += struct.pack("<IQ", 0, offset)
        offset += (array.nbytes + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT
    head = header + infos
    padding = (-len(head)) % ALIGNMENT
    with open(path, "wb") as handle:
        handle.write(head + b"\0" * padding)
        for array in arrays:
            data = array.tobytes()
            handle.write(data + b"\0" * ((-len(data)) % ALIGNMENT))
