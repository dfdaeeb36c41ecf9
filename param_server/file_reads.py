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
import ctypes
import ctypes.util
import errno
import itertools
import math
import mmap
import os
import threading

import google_crc32c
import numpy as np

from param_server.errors import CorruptVersionError, IncompleteVersionError


def supported(url: str, manifest: dict, entry: dict) -> bool:
    return url.startswith("file://") and manifest.get("compression", "none") == "none" and len(entry["shape"]) > 0


def root_of(url: str) -> str:
    return url[len("file://"):]


class DirectReader:
    """Chunk reads in a thread pool (file reads release the GIL): ``threads`` reads in flight,
    with O_DIRECT when ``direct`` (turned off for good once the file system refuses it)."""

    def __init__(self, threads: int, direct: bool):
        self.pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="param-read")
        self.direct = direct and hasattr(os, "O_DIRECT")

    def read(self, path: str, entry: dict, indices: list[tuple], version: int, leaf: str) -> PendingDirect:
        return PendingDirect(self, path, entry, indices, version, leaf)


def _bounds(index: tuple, shape: list[int]) -> list[tuple[int, int]]:
    return [s.indices(n)[:2] for s, n in zip(index, shape, strict=True)]


# Evicted reads are latency-bound: a chunk is read as several segments in flight at once (the
# kernel's readahead alone keeps one request per file in flight). With O_DIRECT (store.direct_io)
# the device writes straight into our buffer: no page-cache copy, and each segment is one request
# of its full size; what the page cache already holds is copied from it instead. Buffers start
# on a block boundary (which also lets a CPU device array be made from the buffer itself, without
# a copy) and span whole blocks, as O_DIRECT needs.
SEGMENT_BYTES = 1 << 20
BLOCK = 4096
PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]


def _aligned(nbytes: int) -> np.ndarray:
    raw = np.empty(nbytes + BLOCK, np.uint8)
    off = (-raw.ctypes.data) % BLOCK
    return raw[off:off + nbytes]


class _Chunk:
    """One chunk file being read into its buffer as segments; the last one to finish checks it."""

    def __init__(self, reader: DirectReader, path: str, nbytes: int, version: int, leaf: str):
        self.reader, self.path, self.version, self.leaf = reader, path, version, leaf
        self.size = nbytes + 4  # the elements, then their crc32c
        self.buf = _aligned(-(-self.size // BLOCK) * BLOCK)
        bounds = list(range(0, self.size, SEGMENT_BYTES)) + [self.size]
        self._left = len(bounds) - 1
        self._lock = threading.Lock()
        self.futures = [reader.pool.submit(self._segment, lo, hi, i == 0)
                        for i, (lo, hi) in enumerate(itertools.pairwise(bounds))]

    def _error(self, what: str) -> CorruptVersionError:
        return CorruptVersionError(self.version,
                                   f"version {self.version}: leaf {self.leaf!r} ({self.path}) {what}")

    def _open(self, flags: int) -> int:
        try:
            return os.open(self.path, os.O_RDONLY | flags)
        except FileNotFoundError as e:
            raise IncompleteVersionError(self.version, f"version {self.version}: leaf {self.leaf!r} "
                                         f"({self.path}) is incomplete: chunk missing") from e

    def _read_direct(self, lo: int, hi: int) -> bool:
        """One O_DIRECT request for the segment (rounded up to whole blocks); False where the
        file system refuses O_DIRECT (the reader then reads through the page cache)."""
        fd = None
        try:
            fd = self._open(os.O_DIRECT)
            n = os.preadv(fd, [memoryview(self.buf)[lo:min(-(-hi // BLOCK) * BLOCK, len(self.buf))]], lo)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            self.reader.direct = False
            return False
        finally:
            if fd is not None:
                os.close(fd)
        if n != hi - lo:
            raise self._error("has a chunk of the wrong size")
        return True

    def _cached(self, lo: int, hi: int) -> bool:
        """Whether the page cache holds all of [lo, hi): mincore on a mapping of the file, a
        probe that (unlike a non-blocking read, which starts readahead) issues no I/O."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return False
        try:
            m = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)  # private: ctypes may take its address
        except (OSError, ValueError):
            os.close(fd)
            return False
        try:
            start = lo // PAGE * PAGE
            pages = -(-(min(hi, len(m)) - start) // PAGE)
            if pages <= 0:  # a short file: the read reports it
                return False
            vec = (ctypes.c_ubyte * pages)()
            anchor = ctypes.c_char.from_buffer(m)
            try:
                rc = _libc.mincore(ctypes.addressof(anchor) + start, pages * PAGE, vec)
            finally:
                del anchor
            return rc == 0 and bool((np.frombuffer(vec, np.uint8) & 1).all())
        finally:
            m.close()
            os.close(fd)

    def _read_buffered(self, lo: int, hi: int) -> None:
        fd = self._open(0)
        try:
            view = memoryview(self.buf)[lo:hi]
            while view.nbytes:
                n = os.preadv(fd, [view], lo)
                if n <= 0:
                    raise self._error("has a chunk of the wrong size")
                view, lo = view[n:], lo + n
        finally:
            os.close(fd)

    def _segment(self, lo: int, hi: int, first: bool) -> None:
        if first:
            try:
                size = os.stat(self.path).st_size
            except FileNotFoundError:
                size = None
            if size is not None and size != self.size:
                raise self._error("has a chunk of the wrong size")
        if self.reader.direct:
            # Cached pages are copied (faster than the device); the rest goes to the device.
            if self._cached(lo, hi) or not self._read_direct(lo, hi):
                self._read_buffered(lo, hi)
        else:
            self._read_buffered(lo, hi)
        with self._lock:
            self._left -= 1
            last = self._left == 0
        if last:  # every segment is in: the checksum, on this reader thread
            data = self.buf[:self.size - 4]
            if google_crc32c.value(data) != int.from_bytes(self.buf[self.size - 4:self.size].tobytes(), "little"):
                raise self._error("failed its checksum")

    def result(self) -> np.ndarray:
        for f in self.futures:
            f.result()
        return self.buf[:self.size - 4]


class PendingDirect:
    """The chunk reads one leaf's slices need, in flight; ``results`` assembles the slices."""

    def __init__(self, reader: DirectReader, path: str, entry: dict, indices: list[tuple], version: int,
                 leaf: str):
        self.shape, self.chunks = list(entry["shape"]), list(entry["chunks"])
        self.dtype = np.dtype(entry["dtype"])
        self.indices = indices
        nbytes = math.prod(self.chunks) * self.dtype.itemsize
        self.futures = {}
        for index in indices:
            for c in self._chunks_of(index):
                if c not in self.futures:
                    cpath = os.path.join(path, "c", *map(str, c))
                    self.futures[c] = _Chunk(reader, cpath, nbytes, version, leaf)

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
            shape = [hi - lo for lo, hi in bounds]
            arr = _aligned(math.prod(shape) * self.dtype.itemsize).view(self.dtype).reshape(shape)
            for c, chunk in data.items():
                src, dst = [], []
                for (lo, hi), ci, n in zip(bounds, c, self.chunks, strict=True):
                    a, b = max(lo, ci * n), min(hi, (ci + 1) * n)
                    src.append(slice(a - ci * n, b - ci * n))
                    dst.append(slice(a - lo, b - lo))
                arr[tuple(dst)] = chunk[tuple(src)]
            out[index_key(index)] = arr
        return out
