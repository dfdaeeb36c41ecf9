"""Direct reads of uncompressed zarr3 chunks from a file:// store: the pull's fast path.

An uncompressed chunk of our arrays (codecs ``bytes`` then ``crc32c``) is the chunk's
little-endian elements followed by their 4-byte crc32c. Reading the file straight into the
buffer the device array is made from, and checking the crc32c there, saves tensorstore's
decode copy and its per-chunk overhead; a chunk equal to a device's slice (the training
layout) goes to the device with no further copy. Shapes, dtypes and chunk shapes come from the
digest-checked manifest, so zarr.json is not read. Other stores and compressed versions use
tensorstore.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import math
import os

import google_crc32c
import numpy as np

from param_server.errors import CorruptVersionError, IncompleteVersionError


def supported(url: str, manifest: dict, entry: dict) -> bool:
    return url.startswith("file://") and manifest.get("compression", "none") == "none" and len(entry["shape"]) > 0


def root_of(url: str) -> str:
    return url[len("file://"):]


class DirectReader:
    """Chunk reads in a thread pool (file reads release the GIL)."""

    def __init__(self, threads: int):
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="param-read")

    def read(self, path: str, entry: dict, indices: list[tuple], version: int, leaf: str) -> PendingDirect:
        return PendingDirect(self._pool, path, entry, indices, version, leaf)


def _bounds(index: tuple, shape: list[int]) -> list[tuple[int, int]]:
    return [s.indices(n)[:2] for s, n in zip(index, shape, strict=True)]


def _read_chunk(path: str, nbytes: int, version: int, leaf: str) -> np.ndarray:
    buf = np.empty(nbytes + 4, np.uint8)
    try:
        with open(path, "rb", buffering=0) as f:
            n = f.readinto(buf)
            extra = f.read(1)
    except FileNotFoundError as e:
        raise IncompleteVersionError(version, f"version {version}: leaf {leaf!r} ({path}) is incomplete: "
                                     f"chunk missing") from e
    if n != nbytes + 4 or extra:
        raise CorruptVersionError(version, f"version {version}: leaf {leaf!r} ({path}) has a chunk of the "
                                  f"wrong size")
    if google_crc32c.value(buf[:-4]) != int.from_bytes(buf[-4:].tobytes(), "little"):
        raise CorruptVersionError(version, f"version {version}: leaf {leaf!r} ({path}) failed its checksum")
    return buf[:-4]


class PendingDirect:
    """The chunk reads one leaf's slices need, in flight; ``results`` assembles the slices."""

    def __init__(self, pool, path: str, entry: dict, indices: list[tuple], version: int, leaf: str):
        self.shape, self.chunks = list(entry["shape"]), list(entry["chunks"])
        self.dtype = np.dtype(entry["dtype"])
        self.indices = indices
        nbytes = math.prod(self.chunks) * self.dtype.itemsize
        self.futures = {}
        for index in indices:
            for c in self._chunks_of(index):
                if c not in self.futures:
                    cpath = os.path.join(path, "c", *map(str, c))
                    self.futures[c] = pool.submit(_read_chunk, cpath, nbytes, version, leaf)

    def _chunks_of(self, index: tuple):
        ranges = [range(lo // c, -(-hi // c)) for (lo, hi), c in zip(_bounds(index, self.shape), self.chunks,
                                                                     strict=True)]
        return itertools.product(*ranges)

    def results(self) -> dict[tuple, np.ndarray]:
        from param_server.tensor_io import index_key

        out = {}
        for index in self.indices:
            bounds = _bounds(index, self.shape)
            cs = list(self._chunks_of(index))
            data = {c: self.futures[c].result().view(self.dtype).reshape(self.chunks) for c in cs}
            first = [c * n for c, n in zip(cs[0], self.chunks, strict=True)]
            if len(cs) == 1 and all(lo == f and hi - lo == n for (lo, hi), f, n
                                    in zip(bounds, first, self.chunks, strict=True)):
                out[index_key(index)] = data[cs[0]]  # the chunk is the slice: no copy
                continue
            arr = np.empty([hi - lo for lo, hi in bounds], self.dtype)
            for c, chunk in data.items():
                src, dst = [], []
                for (lo, hi), ci, n in zip(bounds, c, self.chunks, strict=True):
                    a, b = max(lo, ci * n), min(hi, (ci + 1) * n)
                    src.append(slice(a - ci * n, b - ci * n))
                    dst.append(slice(a - lo, b - lo))
                arr[tuple(dst)] = chunk[tuple(src)]
            out[index_key(index)] = arr
        return out
