"""Read and write the safetensors format (https://github.com/huggingface/safetensors), so that
other frameworks can read palmcore's weights: an 8-byte little-endian header length, a JSON
header {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}, then
the raw little-endian bytes. Writes are atomic (temporary file, fsync, rename); reads check
every field and name what is wrong with a file.
"""

from __future__ import annotations

import json
import math
import os
import tempfile

import numpy as np

from palmcore.files import umask

_DTYPES = {"F32": np.float32, "F64": np.float64, "I32": np.int32, "I64": np.int64}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


def save_file(tensors: dict[str, np.ndarray], path: str, metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` to ``path`` atomically: readers see the old file or the new one."""
    header, offset = {}, 0
    arrays = []
    for name, value in tensors.items():
        array = np.asarray(value)
        if not array.flags.c_contiguous:  # (ascontiguousarray would turn 0-d into 1-d)
            array = array.copy(order="C")
        if array.dtype not in _NAMES:
            raise TypeError(f"tensor '{name}' has dtype {array.dtype}; supported: "
                            f"{', '.join(str(np.dtype(d)) for d in _DTYPES.values())}")
        array = array.astype(array.dtype.newbyteorder("<"), copy=False)
        header[name] = {"dtype": _NAMES[array.dtype.newbyteorder("=")], "shape": list(array.shape),
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
            dtype = np.dtype(_DTYPES[entry["dtype"]]).newbyteorder("<")
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
        end = stop
    if end != len(data):
        raise ValueError(f"{path}: {len(data) - end} bytes after the last tensor")
    return tensors, metadata
