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
    qg = q.reshape(b, t, hkv, group, d)
    logits = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    mask = attention_mask(t, s, q_segment_ids, kv_segment_ids, causal)[:, None, None]
    logits = jnp.where(mask, logits, NEG_INF)
    probs = jax.nn.softmax(logits, axis=-1)
    probs = jnp.where(mask, probs, 0.0)  # rows with no visible key -> zeros
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
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
