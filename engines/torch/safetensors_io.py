"""Read the safetensors container's header without loading tensor data.

Format: 8-byte little-endian header length N, N bytes of JSON header
(``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``), then the
tensor bytes, offsets relative to the end of the header.

The reader is the `safetensors` library's own (`safe_open`); `header_problem` only explains in
words why it refused a file, because the library's messages ("MetadataIncompleteBuffer") do not
tell a user what is wrong.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
"""Bytes per element of each safetensors dtype tag (the ones a checkpoint may hold)."""
FLOAT_DTYPES = ("F32", "F16", "BF16")
"""Dtypes a weight tensor may have; anything else means a quantized or foreign checkpoint."""


class SafetensorsError(ValueError):
    """A safetensors file cannot be read; the message says why, without the path."""


@dataclass(frozen=True, slots=True)
class TensorEntry:
    """One tensor's header entry."""

    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_tensor_entries(path: Path) -> dict[str, TensorEntry]:
    """Dtype and shape of every tensor in `path`, after the library has checked the whole file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            entries = {}
            for name in f.keys():
                s = f.get_slice(name)
                entries[name] = TensorEntry(dtype=s.get_dtype(), shape=tuple(s.get_shape()))
            return entries
    except Exception as e:  # safetensors raises its own error type, and OSError for short files
        raise SafetensorsError(header_problem(path) or f"safetensors cannot read it ({e})") from e


def header_problem(path: Path) -> str | None:
    """Why `path` is not a complete safetensors file, in words; None when no reason is found."""
    size = path.stat().st_size
    if size < 8:
        return f"only {size} bytes: too short to be a safetensors file (truncated?)"
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n + 8 > size:
            return (
                f"its header claims {n} bytes but the file has only {size}: "
                "truncated, or not a safetensors file"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"its header is not valid JSON ({e}): the file is corrupt"
    if not isinstance(header, dict):
        return "its header is not a JSON object: the file is corrupt"
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = info["data_offsets"]
            want = math.prod(info["shape"]) * DTYPE_BYTES[info["dtype"]]
        except (KeyError, TypeError, ValueError):
            return f"its header entry for tensor {name!r} is malformed: the file is corrupt"
        if stop - begin != want:
            return f"tensor {name!r} spans {stop - begin} bytes but its shape and dtype need {want}"
        end = max(end, stop)
    data = size - 8 - n
    if end > data:
        return f"truncated: its tensors need {end} data bytes but only {data} are present"
    if end < data:
        return f"{data - end} unexpected bytes after the last tensor: the file is corrupt"
    return None
