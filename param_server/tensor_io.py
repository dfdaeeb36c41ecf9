"""zarr3 reads and writes of weight leaves: one array per leaf, crc32c on every chunk.

Writes are chunk-aligned (chunks tile device shards), so no chunk is ever read-modified-written
and each host writes only chunks of its own addressable shards. All chunk writes of a version are
issued at once and run in parallel inside tensorstore, bounded by the context's concurrency.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorstore as ts

from param_server.errors import CorruptVersionError, IncompleteVersionError


def codecs(compression: str) -> list[dict]:
    chain: list[dict] = [{"name": "bytes", "configuration": {"endian": "little"}}]
    if compression == "zstd":
        chain.append({"name": "zstd", "configuration": {"level": 1}})
    chain.append({"name": "crc32c"})
    return chain


def array_spec(shape, dtype: str, chunks, compression: str) -> dict:
    return {
        "driver": "zarr3",
        "metadata": {
            "shape": list(shape),
            "data_type": dtype,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunks)}},
            "chunk_key_encoding": {"name": "default"},
            "codecs": codecs(compression),
            "fill_value": 0 if dtype not in ("bool",) else False,
        },
        # Chunks equal to the fill value (e.g. zero biases) are still written: a missing chunk
        # must always mean "incomplete version", never "zeros".
        "store_data_equal_to_fill_value": True,
    }


def open_for_write(kvstore: ts.KvStore, spec: dict, context: ts.Context, create: bool) -> ts.Future:
    """Process 0 creates the metadata; other hosts assume it and write only chunk keys."""
    opts = {"create": True} if create else {"assume_metadata": True}
    return ts.open(spec, kvstore=kvstore, context=context, **opts)


def write_chunks(arr: ts.TensorStore, pieces: list[tuple[tuple, np.ndarray]]) -> list[ts.Future]:
    """Issues the writes of (index, data) pieces; returns their futures."""
    return [arr[index].write(data) for index, data in pieces]


def classify(version: int, leaf: str, key: str, err: Exception) -> Exception:
    msg = str(err)
    if "DATA_LOSS" in msg or "igest mismatch" in msg or "checksum" in msg.lower():
        return CorruptVersionError(
            version, f"version {version}: leaf {leaf!r} ({key}) failed its checksum: {msg}")
    if "NOT_FOUND" in msg or "missing" in msg:
        return IncompleteVersionError(
            version, f"version {version}: leaf {leaf!r} ({key}) is incomplete: {msg}")
    return CorruptVersionError(version, f"version {version}: leaf {leaf!r} ({key}) cannot be read: {msg}")


def open_for_read(kvstore: ts.KvStore, entry: dict, context: ts.Context) -> ts.Future:
    spec = {
        "driver": "zarr3",
        "open": True,
        "fill_missing_data_reads": False,  # a missing chunk is an error, not zeros
        # The manifest's shape and dtype are constraints: altered zarr.json metadata is refused.
        "metadata": {"shape": list(entry["shape"]), "data_type": entry["dtype"]},
    }
    return ts.open(spec, kvstore=kvstore, context=context)


class PendingRead:
    """Reads of the slices one leaf needs on this host, issued together."""

    def __init__(self, arr: ts.TensorStore, indices: list[tuple], version: int, leaf: str, key: str):
        self.version, self.leaf, self.key = version, leaf, key
        self.futures = {index_key(i): arr[i].read() for i in indices}

    def results(self) -> dict[Any, np.ndarray]:
        out = {}
        for k, f in self.futures.items():
            try:
                out[k] = f.result()
            except Exception as e:
                raise classify(self.version, self.leaf, self.key, e) from e
        return out


def index_key(index: tuple) -> tuple:
    """A hashable form of a tuple of slices."""
    return tuple((s.start, s.stop, s.step) if isinstance(s, slice) else s for s in index)
