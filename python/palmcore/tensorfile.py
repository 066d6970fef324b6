"""Read and write the safetensors format (https://github.com/huggingface/safetensors), so that
other frameworks can read palmcore's weights: an 8-byte little-endian header length, a JSON
header {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}, then
the raw little-endian bytes. Writes are atomic (temporary file, fsync, rename); reads check
every field and name what is wrong with a file.

NumPy has no bfloat16: ``save_file(..., bf16=True)`` writes float32 tensors as BF16 (rounded to
nearest even), and ``load_file`` reads BF16 tensors back as float32 (exactly: every bfloat16 is a
float32). F16 reads and writes as float16.
"""

from __future__ import annotations

import json
import math
import os
import tempfile

import numpy as np

from palmcore.files import umask

_DTYPES = {"F32": np.float32, "F64": np.float64, "I32": np.int32, "I64": np.int64, "F16": np.float16}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}
_BF16 = "BF16"  # stored as the upper 16 bits of a float32; read back as float32


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


def load_file(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, metadata) from ``path``; ValueError naming the problem for a bad file."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read()
    if size < 8:
        raise ValueError(f"{path}: truncated ({size} bytes, not even a header length)")
    n = int.from_bytes(raw[:8], "little")
    if n > size - 8:
        raise ValueError(f"{path}: truncated or corrupt (header of {n} bytes in a {size}-byte file)")
    try:
        header = json.loads(raw[8:8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: corrupt header ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: corrupt header (not a JSON object)")
    metadata = header.pop("__metadata__", {}) or {}
    data = memoryview(raw)[8 + n:]
    tensors, end = {}, 0
    for name, entry in sorted(header.items(), key=lambda item: item[1].get("data_offsets", [0])[0]
                              if isinstance(item[1], dict) else 0):
        try:
            bf16 = entry["dtype"] == _BF16
            dtype = np.dtype(np.uint16 if bf16 else _DTYPES[entry["dtype"]]).newbyteorder("<")
            shape = tuple(int(s) for s in entry["shape"])
            begin, stop = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: bad header entry for '{name}': {entry!r}") from None
        if begin != end or stop < begin or stop - begin != math.prod(shape) * dtype.itemsize:
            raise ValueError(f"{path}: tensor '{name}' has inconsistent offsets {[begin, stop]} "
                             f"for shape {list(shape)} of {entry['dtype']}")
        if stop > len(data):
            raise ValueError(f"{path}: truncated (tensor '{name}' ends at byte {stop} of "
                             f"{len(data)} data bytes)")
        tensors[name] = np.frombuffer(data[begin:stop], dtype=dtype).reshape(shape).astype(
            dtype.newbyteorder("="))
        if bf16:
            tensors[name] = from_bf16_bits(tensors[name])
        end = stop
    if end != len(data):
        raise ValueError(f"{path}: {len(data) - end} bytes after the last tensor")
    return tensors, metadata
