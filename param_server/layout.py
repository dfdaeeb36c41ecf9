"""Key layout, leaf names and the manifest of a weight version.

```
params/LATEST                       {"version", "dir", "step", "epoch", "fence_epoch", ...}
params/committed/v<V:08d>           {"version", "dir", "step", ...}: index of committed versions
params/attempts/<dir>               written before a publish writes data (lets gc find orphans)
params/pins/<reader>                {"version", "expires_at", "reader"}
params/<dir>/MANIFEST.json          leaves (name -> key, shape, dtype, chunks), step, epoch, digest
params/<dir>/arrays/<leaf>/...      one zarr3 array per leaf, crc32c on every chunk
```
``<dir>`` is ``v<V:08d>-e<epoch>``: a stale trainer writing the same version number can never
touch the bytes of the version a newer trainer commits.
"""

from __future__ import annotations

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
LATEST = PREFIX + "LATEST"
COMMITTED = PREFIX + "committed/"
ATTEMPTS = PREFIX + "attempts/"
PINS = PREFIX + "pins/"
MANIFEST = "MANIFEST.json"
FORMAT = 1

_SAFE = set(string.ascii_letters + string.digits + "_.-")
_DIR_RE = re.compile(r"^v(\d{8})-e(\d+)$")


def version_dir(version: int, epoch: int) -> str:
    return f"v{version:08d}-e{epoch}"


def parse_dir(name: str) -> tuple[int, int] | None:
    m = _DIR_RE.match(name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def dir_prefix(dirname: str) -> str:
    return f"{PREFIX}{dirname}/"


def committed_key(version: int) -> str:
    return f"{COMMITTED}v{version:08d}"


def manifest_key(dirname: str) -> str:
    return dir_prefix(dirname) + MANIFEST


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


def array_key(name: str) -> str:
    """Key of a leaf's zarr array inside its version dir (safe on file:// and gs://)."""
    return "arrays/" + "/".join(_escape_segment(s) for s in name.split("/")) + "/"


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
    if m.get("format") != FORMAT:
        raise ValueError(f"manifest format {m.get('format')!r} is not {FORMAT}")
    return m
