"""Pure-jnp reference attention: the ground truth the Pallas kernels are tested against.

Layouts (batch-major, as the model produces them):
  q: [B, T, Hq, D]; k, v: [B, S, Hkv, D] with Hq % Hkv == 0 (grouped-query attention).
Masks: segment ids (0 = padding; attention only within equal non-zero ids) and causality by
array index. Query rows with no visible key (padding, fully masked) return exact zeros.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e30  # finite, so fully masked rows give no NaNs before the final zeroing


def attention_mask(
    q_len: int,
    kv_len: int,
    q_segment_ids: jax.Array | None,
    kv_segment_ids: jax.Array | None,
    causal: bool,
) -> jax.Array:
    """Boolean [B or 1, T, S] mask of allowed (query, key) pairs."""
    mask = jnp.ones((1, q_len, kv_len), dtype=bool)
    if causal:
        mask &= (jnp.arange(q_len)[:, None] >= jnp.arange(kv_len)[None, :])[None]
    if q_segment_ids is not None:
        assert kv_segment_ids is not None, "q_segment_ids needs kv_segment_ids"
        same = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
        mask = mask & same & (q_segment_ids[:, :, None] != 0)
    return mask


def _masked_gqa(qg: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float,
                kv_axes: str) -> jax.Array:
    """Grouped queries qg [B, T, Hkv, G, D] against k, v laid out as ``kv_axes`` (b, s, k = kv
    head, d) under mask [B, 1, 1, T, S]: f32 softmax, rows with no visible key -> zeros."""
    logits = jnp.einsum(f"btkgd,{kv_axes}->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    probs = jnp.where(mask, jax.nn.softmax(jnp.where(mask, logits, NEG_INF), axis=-1), 0.0)
    return jnp.einsum(f"bkgts,{kv_axes}->btkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)


def flash_attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    causal: bool = True,
    scale: float | None = None,
) -> jax.Array:
    """Softmax attention with masks; f32 softmax whatever the input dtype."""
    b, t, hq, d = q.shape
    _, s, hkv, _ = k.shape
    group = hq // hkv
    scale = d**-0.5 if scale is None else scale
    mask = attention_mask(t, s, q_segment_ids, kv_segment_ids, causal)[:, None, None]
    out = _masked_gqa(q.reshape(b, t, hkv, group, d), k, v, mask, scale, "bskd")
    return out.reshape(b, t, hq, d).astype(q.dtype)


def decode_attention_reference(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    lengths: jax.Array,
    *,
    scale: float | None = None,
) -> jax.Array:
    """One query token per sequence over a KV cache with per-sequence valid lengths.

    q: [B, Hq, D]; k_cache, v_cache: [B, Hkv, S, D] (head-major: each head's [S, D] slab is
    contiguous, so the per-step dots need no transpose of the cache); lengths: [B] int32, the
    number of valid cache positions (the current token's K/V already written). Length 0 gives zeros.
    """
    b, hq, d = q.shape
    _, hkv, s, _ = k_cache.shape
    group = hq // hkv
    scale = d**-0.5 if scale is None else scale
    qg = q.reshape(b, hkv, group, d)
    logits = jnp.einsum("bkgd,bksd->bkgs", qg, k_cache, preferred_element_type=jnp.float32) * scale
    mask = (jnp.arange(s)[None, :] < lengths[:, None])[:, None, None, :]
    logits = jnp.where(mask, logits, NEG_INF)
    probs = jnp.where(mask, jax.nn.softmax(logits, axis=-1), 0.0)
    out = jnp.einsum("bkgs,bksd->bkgd", probs.astype(v_cache.dtype), v_cache,
                     preferred_element_type=jnp.float32)
    return out.reshape(b, hq, d).astype(q.dtype)


# -- paged KV cache ----------------------------------------------------------------------------
# Layout (the one JAX's shipped paged kernels use): per layer a pool k_pages, v_pages
# [Hkv, num_pages, page_size, D]; per sequence page_indices [B, pages_per_seq] int32 (entry j
# holds the page of positions j*page_size .. (j+1)*page_size - 1; entries past the live pages
# must still be valid page ids) and int32 lengths. Several sequences may point at the same pages
# (a shared prompt prefix).


def gather_pages(pages: jax.Array, page_indices: jax.Array) -> jax.Array:
    """[Hkv, P, ps, D] pool + [B, n] page table -> the dense [B, Hkv, n * ps, D] cache it describes."""
    hkv, _, ps, d = pages.shape
    b, n = page_indices.shape
    return pages[:, page_indices].reshape(hkv, b, n * ps, d).transpose(1, 0, 2, 3)


def paged_prefill_attention_reference(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    q_start: jax.Array,
    q_lens: jax.Array,
    kv_lens: jax.Array,
    page_indices: jax.Array,
    *,
    scale: float | None = None,
) -> jax.Array:
    """Queries of several tokens per sequence appended at an offset, over a paged cache.

    q: [B, T, Hq, D]; row t of sequence b is the token at absolute position q_start[b] + t and
    is live for t < q_lens[b]. It sees cache positions p < kv_lens[b] with p <= its position
    (causal by absolute position; the new tokens' K/V are expected in the pages already).
    Rows that are not live or see no key return zeros.
    """
    b, t, hq, d = q.shape
    hkv = k_pages.shape[0]
    group = hq // hkv
    scale = d**-0.5 if scale is None else scale
    k, v = gather_pages(k_pages, page_indices), gather_pages(v_pages, page_indices)  # [B, Hkv, S, D]
    s = k.shape[2]
    kv_pos = jnp.arange(s)[None, None, :]
    tok = jnp.arange(t)[None, :, None]
    mask = ((kv_pos < kv_lens[:, None, None]) & (kv_pos <= q_start[:, None, None] + tok)
            & (tok < q_lens[:, None, None]))  # [B, T, S]
    # Stale rows past kv_lens may hold anything (even NaN): keep them out of p @ v.
    v = jnp.where((jnp.arange(s) < kv_lens[:, None])[:, None, :, None], v, 0)
    out = _masked_gqa(q.reshape(b, t, hkv, group, d), k, v, mask[:, None, None], scale, "bksd")
    return out.reshape(b, t, hq, d).astype(q.dtype)


def paged_decode_attention_reference(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    lengths: jax.Array,
    page_indices: jax.Array,
    *,
    scale: float | None = None,
) -> jax.Array:
    """One query per sequence (q [B, Hq, D]) over its first ``lengths`` paged cache positions
    (the current token's K/V already written); length 0 gives zeros."""
    k, v = gather_pages(k_pages, page_indices), gather_pages(v_pages, page_indices)
    v = jnp.where((jnp.arange(v.shape[2]) < lengths[:, None])[:, None, :, None], v, 0)
    return decode_attention_reference(q, k, v, lengths, scale=scale)
