"""Delta encoding of one leaf against the previous version's values, and leaf checksums.

Values are compared bit for bit (as unsigned integers of the same width), so reconstruction is
exact: ``apply(encode(new, old), old)`` returns ``new``'s bytes, NaNs and signed zeros included.
Two encodings:

- ``sparse``: the positions of the changed elements followed by their new values in the stored
  dtype, as one value. Positions are gaps between consecutive changed elements as uint16
  (``gap16``, when every gap fits) or flat indices (``flat32``, ``flat64`` past 2**31 elements).
- ``xor``: ``new ^ old`` as an unsigned array (a zarr3 array, zstd): small updates leave the
  high bits (sign, exponent, leading mantissa) zero, which compresses.

``crc32c`` of the whole leaf (C order, stored dtype) goes in the manifest, so a reader checks the
tensor it reconstructed, not only the bytes it read.
"""

from __future__ import annotations

import google_crc32c
import numpy as np

_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def crc32c(x: np.ndarray) -> int:
    return int(google_crc32c.value(np.ascontiguousarray(x).reshape(-1).view(np.uint8)))


def bits(x: np.ndarray) -> np.ndarray:
    """The elements of ``x`` as unsigned integers of the same width (a view, no copy)."""
    return np.ascontiguousarray(x).view(_UINT[x.dtype.itemsize])


def bits_dtype(dtype: np.dtype) -> str:
    return np.dtype(_UINT[np.dtype(dtype).itemsize]).name


def index_dtype(size: int) -> np.dtype:
    return np.dtype(np.int32 if size < 2**31 else np.int64)


_POSITIONS = {"gap16": np.dtype(np.uint16), "flat32": np.dtype(np.int32), "flat64": np.dtype(np.int64)}


def changed(new: np.ndarray, old: np.ndarray) -> np.ndarray:
    """Flat indices (int64) of the elements whose bits differ."""
    return np.flatnonzero(bits(new).reshape(-1) != bits(old).reshape(-1))


def positions(idx: np.ndarray, size: int) -> tuple[str, np.ndarray]:
    """The compactest encoding of sorted flat indices: uint16 gaps (minus one) if they all fit."""
    gaps = np.diff(idx, prepend=-1) - 1
    if not gaps.size or gaps.max() < 2**16:
        return "gap16", gaps.astype(np.uint16)
    return ("flat32" if size < 2**31 else "flat64"), idx.astype(index_dtype(size))


def sparse_nbytes(kind: str, count: int, new: np.ndarray) -> int:
    return count * (_POSITIONS[kind].itemsize + new.dtype.itemsize)


def encode_sparse(new: np.ndarray, idx: np.ndarray, pos: np.ndarray) -> bytes:
    return pos.tobytes() + np.ascontiguousarray(new).reshape(-1)[idx].tobytes()


def apply_sparse(old: np.ndarray, payload: bytes, count: int, kind: str, in_place: bool = False) -> np.ndarray:
    """``old`` with the payload's values at its positions (a new array unless ``in_place``).
    ValueError if the payload is malformed (then ``old`` is untouched)."""
    ptype = _POSITIONS[kind]
    if len(payload) != count * (ptype.itemsize + old.dtype.itemsize):
        raise ValueError(f"sparse delta of {len(payload)} bytes does not hold {count} elements")
    pos = np.frombuffer(payload, ptype, count)
    idx = np.cumsum(pos.astype(np.int64) + 1) - 1 if kind == "gap16" else pos
    vals = np.frombuffer(payload, old.dtype, count, offset=count * ptype.itemsize)
    if count and (idx.min() < 0 or idx.max() >= old.size):
        raise ValueError("sparse delta indexes outside the leaf")
    out = old if in_place else np.array(old, copy=True, order="C")
    out.reshape(-1)[idx] = vals
    return out


def xor(new: np.ndarray, old: np.ndarray) -> np.ndarray:
    return bits(new) ^ bits(old)


def apply_xor(old: np.ndarray, x: np.ndarray, in_place: bool = False) -> np.ndarray:
    x = x.astype(bits(old).dtype, copy=False)
    if in_place:
        b = bits(old)
        b ^= x.reshape(b.shape)
        return old
    return (bits(old) ^ x).view(old.dtype).reshape(old.shape)
