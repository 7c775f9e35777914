"""Read and check a GGUF file's header, metadata and tensor table without llama.cpp.

llama.cpp's loader aborts the whole process on some malformed files, so the engine runs
these checks first and reports a bad file as a ModelFileError that names the path. The
same reader gives ``crankllm model info`` its figures: parameter count, tensor types and
real bits per weight.

GGUF layout (version 2 and 3, little-endian): magic "GGUF", uint32 version, uint64
tensor count, uint64 metadata count, the metadata key/value pairs, the tensor infos
(name, n_dims, dims, ggml type, offset), then tensor data aligned to
``general.alignment`` (32 by default).
"""

from __future__ import annotations

import math
import mmap
import os
import stat
import struct
from collections import Counter
from dataclasses import dataclass, field

from appliance.errors import ModelFileError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

# Bounds that no real model reaches. A count beyond them means a corrupt header, and
# checking them first keeps a bad file from making the reader allocate gigabytes.
MAX_TENSORS = 1_000_000
MAX_METADATA = 1_000_000
MAX_STRING = 64 * 1024 * 1024
MAX_DIMS = 4

# ggml types by id: (name, block size in elements, bytes per block), from ggml.h and
# ggml.c's type traits (ggml as vendored by llama-cpp-python 0.3.36).
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    9: ("Q8_1", 32, 36),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
}

# llama_ftype values (llama.h) for the file types `crankllm model prepare --quant` offers,
# with the ggml type that most tensors get. Q2_K files keep some tensors at higher
# precision by design, and rows that are not a multiple of 256 fall back further.
LLAMA_FTYPES: dict[str, tuple[int, str]] = {
    "Q4_0": (2, "Q4_0"),
    "Q4_1": (3, "Q4_1"),
    "Q8_0": (7, "Q8_0"),
    "Q5_0": (8, "Q5_0"),
    "Q5_1": (9, "Q5_1"),
    "Q2_K": (10, "Q2_K"),
    "Q3_K_S": (11, "Q3_K"),
    "Q3_K_M": (12, "Q3_K"),
    "Q3_K_L": (13, "Q3_K"),
    "Q4_K_S": (14, "Q4_K"),
    "Q4_K_M": (15, "Q4_K"),
    "Q5_K_S": (16, "Q5_K"),
    "Q5_K_M": (17, "Q5_K"),
    "Q6_K": (18, "Q6_K"),
    "Q2_K_S": (21, "Q2_K"),
    "IQ4_NL": (25, "IQ4_NL"),
    "IQ4_XS": (30, "IQ4_XS"),
}

# Metadata value types (gguf.h: enum gguf_type).
_SCALARS = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i",
    6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d",
}
_STRING = 8
_ARRAY = 9


@dataclass(frozen=True)
class TensorInfo:
    """One entry of the tensor table."""

    name: str
    shape: tuple[int, ...]
    type_id: int
    offset: int

    @property
    def type_name(self) -> str:
        known = GGML_TYPES.get(self.type_id)
        return known[0] if known else f"type{self.type_id}"

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)

    @property
    def n_bytes(self) -> int | None:
        """Size of the tensor's data, or None for a ggml type this reader does not know."""
        known = GGML_TYPES.get(self.type_id)
        if known is None:
            return None
        _, block, block_bytes = known
        return self.n_elements // block * block_bytes


@dataclass(frozen=True)
class GGUFInfo:
    """The header, metadata and tensor table of a GGUF file, checked against its size."""

    path: str
    version: int
    file_size: int
    metadata: dict[str, object]
    tensors: tuple[TensorInfo, ...]
    data_offset: int
    unknown_types: frozenset[int] = field(default=frozenset())

    @property
    def n_params(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    @property
    def tensor_bytes(self) -> int:
        return sum(t.n_bytes or 0 for t in self.tensors)

    @property
    def bits_per_weight(self) -> float:
        """Tensor data bits over all weights, norms and embeddings included."""
        n = self.n_params
        return self.tensor_bytes * 8 / n if n else 0.0

    @property
    def type_counts(self) -> Counter:
        return Counter(t.type_name for t in self.tensors)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", "unknown"))

    @property
    def name(self) -> str:
        return str(self.metadata.get("general.name", os.path.basename(self.path)))

    @property
    def file_type(self) -> str | None:
        """The llama_ftype name recorded in ``general.file_type``, if this reader knows it."""
        ftype = self.metadata.get("general.file_type")
        for name, (value, _) in LLAMA_FTYPES.items():
            if value == ftype:
                return name
        return None

    def fallbacks(self) -> tuple[int, int, Counter]:
        """Count the matrix tensors that could not take the file type's main type.

        Returns (fallen back, matrix tensors, Counter of the types they fell back to).
        K-quant types pack 256 weights per block, so a tensor whose rows are not a
        multiple of 256 wide gets a 32-block type instead. For other file types every
        matrix stored in another type counts. One-dimensional tensors (norms) are F32
        in every file type and are not counted. Without a known file type, nothing
        counts as a fallback.
        """
        ftype = self.file_type
        matrices = [t for t in self.tensors if len(t.shape) >= 2]
        if ftype is None:
            return 0, len(matrices), Counter()
        main_type = LLAMA_FTYPES[ftype][1]
        main_block = next(v[1] for v in GGML_TYPES.values() if v[0] == main_type)
        if main_block == 256:
            fallen = Counter(
                t.type_name
                for t in matrices
                if t.shape[0] % 256 and GGML_TYPES.get(t.type_id, ("", 0, 0))[1] != 256
            )
        else:
            fallen = Counter(t.type_name for t in matrices if t.type_name != main_type)
        return sum(fallen.values()), len(matrices), fallen


class _Reader:
    """Sequential reads over the file mapped into memory, with bounds checks."""

    def __init__(self, data, path: str, size: int):
        self.data = data
        self.path = path
        self.size = size
        self.position = 0

    def _truncated(self, part: str) -> ModelFileError:
        return ModelFileError(
            f"{self.path}: GGUF file is truncated (ends inside the {part}); "
            "prepare or download it again"
        )

    def read(self, n: int, part: str) -> bytes:
        if self.position + n > self.size:
            raise self._truncated(part)
        start = self.position
        self.position += n
        return self.data[start:self.position]

    def unpack(self, fmt: str, part: str):
        width = struct.calcsize(fmt)
        if self.position + width > self.size:
            raise self._truncated(part)
        value = struct.unpack_from(fmt, self.data, self.position)[0]
        self.position += width
        return value

    def string(self, part: str) -> str:
        length = self.unpack("<Q", part)
        if length > MAX_STRING:
            raise ModelFileError(f"{self.path}: invalid GGUF file: {part} has length {length}")
        return self.read(length, part).decode("utf-8", errors="replace")

    def skip_strings(self, count: int, part: str) -> None:
        # A vocabulary has about 50,000 strings that nothing here needs. Stepping over
        # their lengths without decoding keeps the check fast at every start.
        unpack_from = struct.unpack_from
        data, position, size = self.data, self.position, self.size
        for _ in range(count):
            if position + 8 > size:
                raise self._truncated(part)
            position += 8 + unpack_from("<Q", data, position)[0]
        if position > size:
            raise self._truncated(part)
        self.position = position

    def value(self, value_type: int, part: str):
        if value_type in _SCALARS:
            return self.unpack(_SCALARS[value_type], part)
        if value_type == _STRING:
            return self.string(part)
        if value_type == _ARRAY:
            item_type = self.unpack("<I", part)
            count = self.unpack("<Q", part)
            if item_type == _ARRAY or count > self.size:
                raise ModelFileError(f"{self.path}: invalid GGUF file: bad array in {part}")
            if item_type in _SCALARS:
                fmt = _SCALARS[item_type]
                width = struct.calcsize(fmt)
                if self.position + count * width > self.size:
                    raise self._truncated(part)
                # Large arrays (vocabulary scores, token types) are skipped, not decoded:
                # nothing here needs them and decoding 49k floats costs time at each start.
                if count > 64:
                    self.position += count * width
                    return f"<{count} values>"
                return [self.unpack(fmt, part) for _ in range(count)]
            if item_type == _STRING:
                if count > 64:
                    self.skip_strings(count, part)
                    return f"<{count} strings>"
                return [self.string(part) for _ in range(count)]
            raise ModelFileError(f"{self.path}: invalid GGUF file: array type {item_type} in {part}")
        raise ModelFileError(f"{self.path}: invalid GGUF file: value type {value_type} in {part}")


def read_gguf(path: str | os.PathLike) -> GGUFInfo:
    """Check that ``path`` is a readable, complete GGUF file and return its declared contents.

    Raises ModelFileError naming the path for a missing, unreadable, non-regular, empty,
    foreign, truncated or inconsistent file.
    """
    path = os.fspath(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ModelFileError(
            f"model file not found: {path}; run `crankllm model prepare` or set [model] path"
        ) from None
    except PermissionError:
        raise ModelFileError(
            f"model file is not readable: {path} (a parent directory denies access); "
            "give the service user access to it"
        ) from None
    except OSError as err:
        raise ModelFileError(f"cannot access model file {path}: {err.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise ModelFileError(f"model path is a directory, not a GGUF file: {path}")
    if not stat.S_ISREG(st.st_mode):
        raise ModelFileError(f"model path is not a regular file: {path}")
    if st.st_size == 0:
        raise ModelFileError(f"model file is empty: {path}; prepare or download it again")
    try:
        handle = open(path, "rb")
    except PermissionError:
        raise ModelFileError(
            f"model file is not readable: {path}; give the service user read access "
            "(chmod o+r or chgrp crankllm)"
        ) from None
    except OSError as err:
        raise ModelFileError(f"cannot open model file {path}: {err.strerror}") from None
    with handle:
        try:
            data = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as err:
            raise ModelFileError(f"cannot map model file {path}: {err}") from None
        with data:
            return _read(_Reader(data, path, st.st_size))


def _read(reader: _Reader) -> GGUFInfo:
    path = reader.path
    magic = reader.data[:4]
    reader.position = 4
    if magic != GGUF_MAGIC:
        start = magic.decode("ascii", errors="backslashreplace")
        raise ModelFileError(
            f"not a GGUF file: {path} starts with \"{start}\" instead of \"GGUF\"; "
            "give the path of a .gguf model, or prepare one with `crankllm model prepare`"
        )
    version = reader.unpack("<I", "header")
    if version not in SUPPORTED_VERSIONS:
        raise ModelFileError(
            f"unsupported GGUF version {version} in {path}; "
            f"supported: {', '.join(map(str, SUPPORTED_VERSIONS))}"
        )
    n_tensors = reader.unpack("<Q", "header")
    n_metadata = reader.unpack("<Q", "header")
    if n_tensors == 0 or n_tensors > MAX_TENSORS or n_metadata > MAX_METADATA:
        raise ModelFileError(
            f"invalid GGUF header in {path}: {n_tensors} tensors, {n_metadata} metadata keys"
        )

    metadata: dict[str, object] = {}
    for index in range(n_metadata):
        key = reader.string(f"metadata key {index}")
        value_type = reader.unpack("<I", f"metadata {key}")
        metadata[key] = reader.value(value_type, f"metadata {key}")

    tensors = []
    for index in range(n_tensors):
        name = reader.string(f"tensor info {index}")
        n_dims = reader.unpack("<I", f"tensor {name}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise ModelFileError(f"invalid GGUF file {path}: tensor {name} has {n_dims} dimensions")
        shape = tuple(reader.unpack("<Q", f"tensor {name}") for _ in range(n_dims))
        type_id = reader.unpack("<I", f"tensor {name}")
        offset = reader.unpack("<Q", f"tensor {name}")
        tensors.append(TensorInfo(name, shape, type_id, offset))

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise ModelFileError(f"invalid GGUF file {path}: general.alignment = {alignment!r}")
    position = reader.position
    data_offset = (position + alignment - 1) // alignment * alignment

    unknown = frozenset(t.type_id for t in tensors if t.type_id not in GGML_TYPES)
    data_end = data_offset + max(
        (t.offset + (t.n_bytes or 0) for t in tensors), default=0
    )
    if data_end > reader.size:
        raise ModelFileError(
            f"GGUF file is truncated: {path} is {reader.size} bytes but its tensors "
            f"need {data_end}; prepare or download it again"
        )
    return GGUFInfo(
        path=path,
        version=version,
        file_size=reader.size,
        metadata=metadata,
        tensors=tuple(tensors),
        data_offset=data_offset,
        unknown_types=unknown,
    )
