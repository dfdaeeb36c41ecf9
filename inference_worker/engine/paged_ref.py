"""Attention over a paged KV cache, in jnp: the contract the Pallas paged kernels implement.

Layout, per layer: ``k_pages, v_pages: [Hkv, num_pages, page_size, D]`` (head-major, so a kv
head's pages are one contiguous block and tensor parallelism splits pages with their heads);
``page_indices: [B, pages_per_seq] int32`` maps a sequence's logical page j (positions
``j * page_size ... (j + 1) * page_size - 1``) to a pool page; ``lengths: [B] int32`` counts its
valid positions. Only the pages named in ``page_indices`` are read. Queries are pre-scaled when
``scale`` is 1.0 (the engine folds 1/sqrt(D) into its q weights). Softmax statistics are f32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf
IMPLS = ("auto", "reference")


def _check_impl(where: str, impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"{where}: impl={impl!r}: only the jnp implementation ({IMPLS}) exists for paged "
                         "attention")


def _gather(pages: jax.Array, page_indices: jax.Array) -> jax.Array:
    """[Hkv, P, page_size, D] gathered at [B, n] -> [Hkv, B, n * page_size, D]."""
    hkv, _, ps, d = pages.shape
    b, n = page_indices.shape
    return pages[:, page_indices].reshape(hkv, b, n * ps, d)


def paged_decode_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, lengths: jax.Array,
                           page_indices: jax.Array, *, scale: float | None = None,
                           impl: str = "auto") -> jax.Array:
    """One query token per sequence over its first ``lengths`` positions.

    q: [B, Hq, D] -> [B, Hq, D] in q's dtype; a sequence of length 0 gets zeros.
    """
    _check_impl("paged_decode_attention", impl)
    b, hq, d = q.shape
    hkv = k_pages.shape[0]
    g = hq // hkv
    scale = d**-0.5 if scale is None else scale
    k, v = _gather(k_pages, page_indices), _gather(v_pages, page_indices)
    qg = q.reshape(b, hkv, g, d)
    logits = jnp.einsum("bkgd,kbsd->bkgs", qg, k, preferred_element_type=jnp.float32) * scale
    mask = (jnp.arange(k.shape[2])[None, :] < lengths[:, None])[:, None, None, :]
    logits = jnp.where(mask, logits, NEG_INF)
    probs = jnp.where(mask, jax.nn.softmax(logits, axis=-1), 0.0)
    out = jnp.einsum("bkgs,kbsd->bkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, hq, d).astype(q.dtype)


def paged_prefill_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, q_start: jax.Array,
                            q_lens: jax.Array, kv_lens: jax.Array, page_indices: jax.Array, *,
                            scale: float | None = None, impl: str = "auto") -> jax.Array:
    """Causal attention of a chunk of new tokens against the sequence's pages (the chunk's own K/V
    already written into them).

    q: [B, T, Hq, D]; query t of row b sits at position ``q_start[b] + t`` and is real when
    ``t < q_lens[b]``; it sees positions ``<= q_start[b] + t`` and ``< kv_lens[b]``.
    Returns [B, T, Hq, D] in q's dtype, zeros for padding queries.
    """
    _check_impl("paged_prefill_attention", impl)
    b, t, hq, d = q.shape
    hkv = k_pages.shape[0]
    g = hq // hkv
    scale = d**-0.5 if scale is None else scale
    k, v = _gather(k_pages, page_indices), _gather(v_pages, page_indices)
    qg = q.reshape(b, t, hkv, g, d)
    logits = jnp.einsum("btkgd,kbsd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    q_pos = q_start[:, None] + jnp.arange(t)[None, :]  # [B, T]
    kv_pos = jnp.arange(k.shape[2])
    mask = ((kv_pos[None, None, :] <= q_pos[:, :, None]) & (kv_pos[None, None, :] < kv_lens[:, None, None])
            & (jnp.arange(t)[None, :, None] < q_lens[:, None, None]))  # [B, T, S]
    mask = mask[:, None, None]
    logits = jnp.where(mask, logits, NEG_INF)
    probs = jnp.where(mask, jax.nn.softmax(logits, axis=-1), 0.0)
    out = jnp.einsum("bkgts,kbsd->btkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, hq, d).astype(q.dtype)
