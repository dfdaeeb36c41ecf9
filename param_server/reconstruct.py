"""Whole-leaf host reads: keyframes, delta chains, and the host copy a delta is applied to.

A delta version names its ``base`` (the publisher's previous version); a keyframe names none.
A reader that holds the base (``Held``) applies the delta to it; any other reader walks back to
the nearest keyframe and applies the deltas after it. Every reconstructed leaf is checked
against the crc32c its manifest records, so a damaged delta (or a damaged base) is refused
instead of being served. The held arrays are never modified (a refused version leaves the
reader with exactly what it had); only arrays one read made itself are updated in place by the
later deltas of its chain (an error discards them all).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from param_server import delta, file_reads, layout, tensor_io
from param_server.errors import CorruptVersionError, IncompleteVersionError, VersionNotFoundError


@dataclasses.dataclass
class Held:
    """A host copy of one version's leaves (stored dtype, whole leaves) and its manifest."""

    version: int
    manifest: dict
    arrays: dict[str, np.ndarray]


def chain(ps, version: int, held: Held | None) -> list[tuple[int, dict]]:
    """[(version, manifest)] to apply, oldest first: from a keyframe, or from the version right
    after ``held`` when ``held`` is on the chain."""
    out = []
    v = version
    while True:
        if held is not None and v == held.version:
            break
        try:
            m = ps.read_manifest(v)
        except VersionNotFoundError as e:
            raise IncompleteVersionError(version, f"version {version}: its delta chain is broken at "
                                         f"version {v}: {e}") from e
        out.append((v, m))
        if m.get("kind", "keyframe") == "keyframe":
            break
        v = int(m["base"])
    return out[::-1]


def read(ps, version: int, names: list[str], held: Held | None) -> Held:
    """Reconstructs ``names`` of ``version`` on the host, applying deltas to ``held`` if it is
    the version's base (or on the chain), else from the nearest keyframe."""
    steps = chain(ps, version, held)
    on_chain = held is not None and steps and steps[0][1].get("base") == held.version
    arrays = dict(held.arrays) if on_chain else {}
    src = {n: held.manifest for n in names} if on_chain else {}  # the version each array is of
    owned: set[str] = set()  # arrays this read made: later steps of the chain may update them in place
    # A leaf written in full at some step needs nothing from the steps before it.
    start = {n: max([i for i, (_, m) in enumerate(steps)
                     if n in m["leaves"] and layout.entry_kind(m["leaves"][n]) == "full"], default=0)
             for n in names}
    for i, (v, m) in enumerate(steps):
        todo = [n for n in names if start[n] <= i]
        arrays.update(_apply(ps, v, m, todo, arrays, src, owned))
        src.update(dict.fromkeys(todo, m))
    return Held(version, steps[-1][1] if steps else held.manifest, {n: arrays[n] for n in names})


def _same_bytes(e: dict, m: dict, prev: dict | None, name: str) -> bool:
    """A full entry naming the bytes the held array came from (``prev``: the manifest of the
    version the array is of): an unchanged leaf, nothing to read."""
    p = prev["leaves"].get(name) if prev is not None else None
    return (p is not None and layout.entry_kind(p) == "full" and "crc32c" in e
            and p.get("crc32c") == e["crc32c"] and p["key"] == e["key"]
            and layout.entry_dir(p, prev) == layout.entry_dir(e, m))


def _apply(ps, version: int, m: dict, names: list[str], cur: dict[str, np.ndarray],
           src: dict[str, dict], owned: set[str]) -> dict[str, np.ndarray]:
    entries = m["leaves"]
    reads = {}
    for name in names:  # every read of this version in flight at once
        e = entries[name]
        kind = layout.entry_kind(e)
        if kind == "full" and name in cur and _same_bytes(e, m, src.get(name), name):
            kind = "same"
        if kind != "same" and kind != "full" and name not in cur:
            raise IncompleteVersionError(version, f"version {version}: leaf {name!r} is a delta but the "
                                         f"base holds no such leaf")
        if kind == "same":
            continue
        if kind == "full" and file_reads.supported(ps.url, m, e):
            reads[name] = ("direct", ps.read_direct(m, name, [tuple(slice(0, n) for n in e["shape"])], version))
            continue
        base = ps.kv.sub(ps.keys.dir_prefix(layout.entry_dir(e, m)))
        if kind == "sparse":
            reads[name] = ("sparse", base.read(e["key"]))
        else:
            spec = e if kind == "full" else {"shape": e["shape"], "dtype": e["bits_dtype"]}
            reads[name] = (kind, tensor_io.open_for_read(base / e["key"], spec, ps.context))
    opened = {}
    for name, (kind, fut) in reads.items():
        if kind == "direct":
            opened[name] = (kind, fut)
            continue
        try:
            r = fut.result()
        except Exception as ex:
            raise tensor_io.classify(version, name, entries[name]["key"], ex) from ex
        opened[name] = (kind, r if kind == "sparse" else r.read())
    out = {}
    for name in names:
        e = entries[name]
        kind = layout.entry_kind(e)
        if kind == "same" or (name not in reads and name in cur):
            if name not in cur:
                raise IncompleteVersionError(version, f"version {version}: leaf {name!r} is unchanged "
                                             f"but the base holds no such leaf")
            out[name] = cur[name]
            continue
        kind, got = opened[name]
        key = entries[name]["key"]
        try:
            if kind == "sparse":
                if got.state != "value":
                    raise IncompleteVersionError(version, f"version {version}: sparse delta of leaf "
                                                 f"{name!r} ({key}) is missing")
                payload = bytes(got.value)
                if delta.crc32c(np.frombuffer(payload, np.uint8)) != e["payload_crc32c"]:
                    raise CorruptVersionError(version, f"version {version}: sparse delta of leaf {name!r} "
                                              f"({key}) failed its checksum")
                new = delta.apply_sparse(cur[name], payload, int(e["count"]), e["positions"], name in owned)
            elif kind == "direct":
                new = next(iter(got.results().values()))
            else:
                data = got.result()
                new = np.asarray(data) if kind == "full" else delta.apply_xor(cur[name], data, name in owned)
        except (CorruptVersionError, IncompleteVersionError):
            raise
        except ValueError as ex:
            raise CorruptVersionError(version, f"version {version}: delta of leaf {name!r} ({key}): {ex}") from ex
        except Exception as ex:
            raise tensor_io.classify(version, name, key, ex) from ex
        if "crc32c" in e and delta.crc32c(new) != e["crc32c"]:
            raise CorruptVersionError(version, f"version {version}: leaf {name!r} reconstructed from "
                                      f"{kind} data does not match its checksum")
        out[name] = new
        if new.flags.writeable:
            owned.add(name)
    return out


def to_device(held: Held, named: list[tuple[str, Any]], sharding_of) -> list[Any]:
    """Device arrays of ``named`` target leaves (ShapeDtypeStructs) from the host copy."""
    leaves = []
    for name, t in named:
        host, dtype = held.arrays[name], jnp.dtype(t.dtype)
        leaves.append(jax.make_array_from_callback(
            tuple(t.shape), sharding_of(t), lambda index, h=host, d=dtype: np.asarray(h[index]).astype(d)))
    return leaves
