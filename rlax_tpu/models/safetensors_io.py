"""Minimal safetensors reader (memory-mapped numpy views) and writer.

Reading maps each file once and hands out zero-copy views, so a tensor's bytes are touched only
when a slice of it is used (make_array_from_callback reads just each device's shard).
bf16 maps to ml_dtypes.bfloat16, which numpy itself lacks.
"""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
NAMES = {v: k for k, v in DTYPES.items()}


class SafetensorsError(ValueError):
    pass


def read_header(path: str) -> tuple[dict, int]:
    """(header dict without __metadata__, byte offset where the data starts)."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise SafetensorsError(f"{path}: not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", raw)
        if n > os.path.getsize(path):
            raise SafetensorsError(f"{path}: not a safetensors file (bad header length)")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


def open_tensors(path: str) -> dict[str, np.ndarray]:
    """Name -> read-only memory-mapped numpy array, for every tensor in the file."""
    header, start = read_header(path)
    buf = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for name, info in header.items():
        if info["dtype"] not in DTYPES:
            raise SafetensorsError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        dt = DTYPES[info["dtype"]]
        b, e = info["data_offsets"]
        shape = tuple(info["shape"])
        if e - b != int(np.prod(shape, dtype=np.int64)) * dt.itemsize:
            raise SafetensorsError(f"{path}: tensor {name!r} byte range does not match shape {shape}")
        out[name] = buf[start + b: start + e].view(dt).reshape(shape)
    return out


def save(tensors: dict[str, np.ndarray], path: str) -> None:
    """Writes a safetensors file (format 'pt' metadata, as transformers expects)."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    arrays = []
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        if a.dtype not in NAMES:
            raise SafetensorsError(f"tensor {name!r}: dtype {a.dtype} cannot be saved")
        header[name] = {"dtype": NAMES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays.append(a)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data aligned to 8 bytes, like the reference writer
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for a in arrays:
            f.write(a.tobytes())
    os.replace(tmp, path)
