"""Read and write the safetensors format (https://github.com/huggingface/safetensors), so that
other frameworks can read palmcore's weights: an 8-byte little-endian header length, a JSON
header {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}, then
the raw little-endian bytes. Writes are atomic (temporary file, fsync, rename); reads open only
regular files, check every field of the header (and that the tensors tile the data exactly)
before reading the data, and name the file and the field that is wrong.

NumPy has no bfloat16: ``save_file(..., bf16=True)`` writes float32 tensors as BF16 (rounded to
nearest even), and ``load_file`` reads BF16 tensors back as float32 (exactly: every bfloat16 is a
float32). F16 reads and writes as float16.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import reprlib
import tempfile
from typing import BinaryIO

import numpy as np

from palmcore.files import open_regular, umask

_DTYPES = {"F32": np.float32, "F64": np.float64, "I32": np.int32, "I64": np.int64, "F16": np.float16}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}
_BF16 = "BF16"  # stored as the upper 16 bits of a float32; read back as float32
# every dtype the format defines, by its size in bytes: a header is checked whatever its dtypes
_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
             "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit


def to_bf16_bits(array: np.ndarray) -> np.ndarray:
    """The bfloat16 nearest to each float32 (ties to even; NaN stays a quiet NaN), as uint16 bits."""
    bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
    rounded = (bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)
    nan = (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    return np.where(nan, (bits >> np.uint32(16)) | np.uint32(0x40), rounded).astype(np.uint16)


def from_bf16_bits(bits: np.ndarray) -> np.ndarray:
    """float32 values of bfloat16 bits (exact)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def save_file(tensors: dict[str, np.ndarray], path: str, metadata: dict[str, str] | None = None,
              bf16: bool = False) -> None:
    """Write ``tensors`` to ``path`` atomically: readers see the old file or the new one. With
    ``bf16``, float32 tensors are written as BF16 (rounded to nearest even)."""
    header, offset = {}, 0
    arrays = []
    for name, value in tensors.items():
        array = np.asarray(value)
        if not array.flags.c_contiguous:  # (ascontiguousarray would turn 0-d into 1-d)
            array = array.copy(order="C")
        if array.dtype not in _NAMES:
            raise TypeError(f"tensor '{name}' has dtype {array.dtype}; supported: "
                            f"{', '.join(str(np.dtype(d)) for d in _DTYPES.values())}")
        dtype_name = _NAMES[array.dtype]
        if bf16 and array.dtype == np.float32:
            array, dtype_name = to_bf16_bits(array).reshape(array.shape), _BF16
        array = array.astype(array.dtype.newbyteorder("<"), copy=False)
        header[name] = {"dtype": dtype_name, "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
        arrays.append(array)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # data starts 8-byte aligned
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".safetensors")
    try:
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes it 0600
        with os.fdopen(fd, "wb") as f:
            f.write(len(encoded).to_bytes(8, "little"))
            f.write(encoded)
            for array in arrays:
                f.write(array.tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@dataclasses.dataclass(frozen=True)
class Entry:
    """One tensor of a safetensors header: its dtype's name, shape and [begin, end) in the data."""
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def read_header(path: str) -> tuple[dict[str, Entry], dict[str, str]]:
    """(entries, metadata) of the safetensors file ``path``, every field checked (whatever the
    dtype: a reader can name one it does not convert); ValueError naming the file and the field."""
    with open_regular(path) as f:
        entries, metadata, _ = _read_header(f, path)
    return entries, metadata


def load_file(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, metadata) from ``path``; ValueError naming the problem for a bad file."""
    with open_regular(path) as f:
        entries, metadata, data_bytes = _read_header(f, path)
        unknown = {name: e.dtype for name, e in entries.items() if e.dtype not in _DTYPES and e.dtype != _BF16}
        if unknown:
            name, dtype = next(iter(unknown.items()))
            raise ValueError(f"{path}: tensor '{name}' has dtype {dtype}, which palmcore does not read "
                             f"(it reads {', '.join([*_DTYPES, _BF16])})")
        data = f.read(data_bytes)
    if len(data) != data_bytes:
        raise ValueError(f"{path}: truncated while it was read")
    tensors = {}
    for name, entry in entries.items():
        bf16 = entry.dtype == _BF16
        dtype = np.dtype(np.uint16 if bf16 else _DTYPES[entry.dtype]).newbyteorder("<")
        tensors[name] = np.frombuffer(data, dtype=dtype, count=math.prod(entry.shape), offset=entry.begin).reshape(
            entry.shape).astype(dtype.newbyteorder("="))
        if bf16:
            tensors[name] = from_bf16_bits(tensors[name])
    return tensors, metadata


def _read_header(f: BinaryIO, path: str) -> tuple[dict[str, Entry], dict[str, str], int]:
    """(entries, metadata, size of the data) of the open safetensors file ``f``, which is left
    at the start of the data: the tensors tile the data exactly, in order, with no gap or overlap."""
    size = os.fstat(f.fileno()).st_size
    if size < 8:
        raise ValueError(f"{path}: truncated ({size} bytes, not even a header length)")
    n = int.from_bytes(f.read(8), "little")
    if n > size - 8:
        raise ValueError(f"{path}: truncated or corrupt (header of {n} bytes in a {size}-byte file)")
    if n > MAX_HEADER_BYTES:
        raise ValueError(f"{path}: corrupt header (header of {n} bytes, beyond safetensors' limit of "
                         f"{MAX_HEADER_BYTES})")
    try:
        header = json.loads(f.read(n).decode("utf-8"))
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ValueError(f"{path}: corrupt header (not UTF-8 JSON: {type(e).__name__})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: corrupt header (not a JSON object but {type(header).__name__})")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError(f"{path}: corrupt header (__metadata__ must map strings to strings, got "
                         f"{reprlib.repr(metadata)})")
    entries = {name: _entry(path, name, value) for name, value in header.items()}
    end = 0
    for name, entry in sorted(entries.items(), key=lambda item: (item[1].begin, item[1].end)):
        if entry.begin != end:
            raise ValueError(f"{path}: tensor '{_short(name)}' has data_offsets {[entry.begin, entry.end]}, but the "
                             f"tensors before it end at byte {end} (the data must be tiled without gaps or overlaps)")
        end = entry.end
    data_bytes = size - 8 - n
    if end > data_bytes:
        last = max(entries, key=lambda name: entries[name].end)
        raise ValueError(f"{path}: truncated (tensor '{_short(last)}' ends at byte {end} of {data_bytes} data bytes)")
    if end != data_bytes:
        raise ValueError(f"{path}: {data_bytes - end} bytes after the last tensor")
    return entries, metadata, data_bytes


def _entry(path: str, name: str, value) -> Entry:
    where = f"{path}: tensor '{_short(name)}'"
    if not isinstance(value, dict):
        raise ValueError(f"{where}: a header entry must be an object, got {reprlib.repr(value)}")
    missing = [field for field in ("dtype", "shape", "data_offsets") if field not in value]
    if missing:
        raise ValueError(f"{where}: the header entry has no {', '.join(missing)}")
    dtype, shape, offsets = value["dtype"], value["shape"], value["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _ITEMSIZE:
        raise ValueError(f"{where}: unknown dtype {reprlib.repr(dtype)}")
    if not isinstance(shape, list) or not all(_natural(s) for s in shape):
        raise ValueError(f"{where}: shape must be a list of non-negative integers, got {reprlib.repr(shape)}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_natural(o) for o in offsets) \
            or offsets[0] > offsets[1]:
        raise ValueError(f"{where}: data_offsets must be [begin, end] with integers 0 <= begin <= end, got "
                         f"{reprlib.repr(offsets)}")
    if offsets[1] - offsets[0] != math.prod(shape) * _ITEMSIZE[dtype]:
        raise ValueError(f"{where}: data_offsets {offsets} hold {offsets[1] - offsets[0]} bytes, but shape "
                         f"{reprlib.repr(shape)} of {dtype} needs {math.prod(shape) * _ITEMSIZE[dtype]}")
    return Entry(dtype, tuple(shape), offsets[0], offsets[1])


def _natural(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _short(name: str) -> str:
    return name if len(name) <= 80 else name[:77] + "..."
