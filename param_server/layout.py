"""Key layout, leaf names and the manifest of a weight version.

```
<T>LATEST                       {"version", "dir", "step", "epoch", "fence_epoch", ...}
<T>committed/v<V:08d>           {"version", "dir", "step", ...}: index of committed versions
<T>attempts/<dir>               written before a publish writes data (lets gc find orphans)
<T>pins/<reader>                {"version", "expires_at", "reader"}
<T><dir>/MANIFEST.json          leaves (name -> kind, dir, key, shape, dtype, crc32c), step, digest
<T><dir>/arrays/<leaf>/...      one zarr3 array per leaf, crc32c on every chunk
<T><dir>/deltas/<leaf>          a sparse delta (flat indices + values) of one leaf
<T><dir>/xor/<leaf>/...         a zstd-compressed XOR delta (zarr3) of one leaf
```
``<T>`` is a tree's prefix: ``params/`` for the default tree, ``params/<tree>/`` for a named
tree (``base``, ``adapter``, ...), each with its own LATEST, index, pins and versions.
``<dir>`` is ``v<V:08d>-e<epoch>``: a stale trainer writing the same version number can never
touch the bytes of the version a newer trainer commits. A manifest entry's ``dir`` may name
another version's directory of the same tree (a leaf that did not change is not rewritten).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import string
from typing import Any

import jax

from rlax_tpu.store_layout import PARAMS
from rlax_tpu.tree import path_str

PREFIX = PARAMS  # the params/ part of the run's store (the other prefixes: rlax_tpu.store_layout)
MANIFEST = "MANIFEST.json"
FORMAT = 2
FORMATS = (1, 2)  # format 1 (one dir per version, no kinds) is read as all-full entries
DEFAULT_TREE = ""
_RESERVED = {"committed", "attempts", "pins", "LATEST"}
_TREE_RE = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")

_SAFE = set(string.ascii_letters + string.digits + "_.-")
_DIR_RE = re.compile(r"^v(\d{8})-e(\d+)$")


@dataclasses.dataclass(frozen=True)
class TreeKeys:
    """Every key of one named tree of versions."""

    tree: str
    prefix: str

    @property
    def latest(self) -> str:
        return self.prefix + "LATEST"

    @property
    def committed(self) -> str:
        return self.prefix + "committed/"

    @property
    def attempts(self) -> str:
        return self.prefix + "attempts/"

    @property
    def pins(self) -> str:
        return self.prefix + "pins/"

    def dir_prefix(self, dirname: str) -> str:
        return f"{self.prefix}{dirname}/"

    def committed_key(self, version: int) -> str:
        return f"{self.committed}v{version:08d}"

    def manifest_key(self, dirname: str) -> str:
        return self.dir_prefix(dirname) + MANIFEST


def tree_keys(tree: str = DEFAULT_TREE) -> TreeKeys:
    """Keys of ``tree``: '' is the default tree at ``params/`` (the layout before named trees)."""
    if tree == DEFAULT_TREE:
        return TreeKeys(tree, PREFIX)
    if not _TREE_RE.match(tree) or tree in _RESERVED or _DIR_RE.match(tree):
        raise ValueError(f"bad tree name {tree!r}: lowercase letters, digits, '_' and '-', starting "
                         f"with a letter, not {sorted(_RESERVED)} nor a version directory name")
    return TreeKeys(tree, f"{PREFIX}{tree}/")


def version_dir(version: int, epoch: int) -> str:
    return f"v{version:08d}-e{epoch}"


def parse_dir(name: str) -> tuple[int, int] | None:
    m = _DIR_RE.match(name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def flatten(tree: Any) -> tuple[list[tuple[str, Any]], Any]:
    """[(leaf name, leaf)] in tree order, and the treedef; names must be unique."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    named = [(path_str(p), x) for p, x in leaves]
    seen: set[str] = set()
    for name, _ in named:
        if name in seen:
            raise ValueError(f"two leaves of the tree have the same name {name!r}")
        seen.add(name)
    return named, treedef


def _escape_segment(seg: str) -> str:
    if seg in ("", ".", ".."):
        return "~" + seg.encode().hex()
    out = []
    for ch in seg:
        out.append(ch if ch in _SAFE else "~" + ch.encode().hex() + "~")
    return "".join(out)


def _leaf_path(name: str) -> str:
    return "/".join(_escape_segment(s) for s in name.split("/"))


def array_key(name: str) -> str:
    """Key of a leaf's zarr array inside its version dir (safe on file:// and gs://)."""
    return "arrays/" + _leaf_path(name) + "/"


def sparse_key(name: str) -> str:
    """Key of a leaf's sparse delta (one value) inside its version dir."""
    return "deltas/" + _leaf_path(name)


def xor_key(name: str) -> str:
    """Key of a leaf's XOR delta (a zarr3 array) inside its version dir."""
    return "xor/" + _leaf_path(name) + "/"


def entry_kind(entry: dict) -> str:
    return entry.get("kind", "full")


def entry_dir(entry: dict, manifest: dict) -> str:
    """The version directory that holds an entry's bytes (its own unless it names another)."""
    return entry.get("dir", manifest["dir"])


def dirs_named(manifest: dict) -> set[str]:
    """Every version directory a manifest's leaves live in (its own included)."""
    return {manifest["dir"]} | {entry_dir(e, manifest) for e in manifest["leaves"].values()}


def chunk_shape(shard_shape: tuple[int, ...], itemsize: int, target_bytes: int) -> list[int]:
    """Chunks that tile a device shard exactly: halve the largest even dim while too big."""
    chunk = [max(1, d) for d in shard_shape]
    while math.prod(chunk) * itemsize > target_bytes:
        even = [i for i, d in enumerate(chunk) if d % 2 == 0]
        if not even:
            break
        i = max(even, key=lambda j: chunk[j])
        chunk[i] //= 2
    return chunk


def digest(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def encode_manifest(body: dict) -> bytes:
    return json.dumps({**body, "digest": digest(body)}, sort_keys=True, indent=1).encode()


def decode_manifest(raw: bytes) -> dict:
    """The manifest body; ValueError if it does not parse or its digest does not match."""
    try:
        m = json.loads(raw)
        stored = m.pop("digest")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"manifest does not parse: {e}") from e
    if digest(m) != stored:
        raise ValueError("manifest digest mismatch (the manifest bytes were altered)")
    if m.get("format") not in FORMATS:
        raise ValueError(f"manifest format {m.get('format')!r} is not one of {FORMATS}")
    return m
