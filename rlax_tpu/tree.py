"""Names for the leaves of a pytree: one spelling everywhere (param server keys, sharding errors,
optimizer masks, checkpoint tensor maps)."""

from __future__ import annotations

from typing import Any

import jax


def key_name(entry: Any) -> str:
    """One path entry (DictKey, SequenceKey, GetAttrKey, FlattenedIndexKey, or a plain str/int
    as nnx flat states use) as text."""
    if isinstance(entry, jax.tree_util.GetAttrKey):
        return entry.name
    if isinstance(entry, jax.tree_util.SequenceKey):
        return str(entry.idx)
    if isinstance(entry, (jax.tree_util.DictKey, jax.tree_util.FlattenedIndexKey)):
        return str(entry.key)
    return str(entry)


def path_parts(path: tuple) -> tuple[str, ...]:
    """A jax tree path as names. A final ``.value`` attribute (an ``nnx.Variable`` inside an
    ``nnx.State``) is dropped, so a State and its ``to_pure_dict()`` name their leaves alike."""
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
        path = path[:-1]
    return tuple(key_name(k) for k in path)


def path_str(path: tuple) -> str:
    """'layers/0/attn/q_proj' from a jax tree path (or an nnx flat-state path)."""
    return "/".join(path_parts(path))
