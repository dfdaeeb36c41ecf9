"""Target log-probs (and entropy) without the full [B, T, V] logits.

An online logsumexp over vocabulary chunks: a ``lax.scan`` over full chunks plus one tail chunk
(so V need not be a multiple of the chunk). The chunk body is wrapped in ``jax.checkpoint``: the
backward pass recomputes each chunk's logits, so only [B, T]-sized carries are saved per chunk.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_NEG = -1e30  # finite start for the running max: exp(_NEG - m) underflows to 0, no NaN


def _update(carry, logits, targets, offset, entropy: bool):
    m, s, t, tgt = carry
    m_new = jnp.maximum(m, jax.lax.stop_gradient(logits.max(-1)))
    a = jnp.exp(m - m_new)
    e = jnp.exp(logits - m_new[..., None])
    s = s * a + e.sum(-1)
    if entropy:
        t = t * a + (e * logits).sum(-1)
    idx = targets - offset
    hit = (idx >= 0) & (idx < logits.shape[-1])
    picked = jnp.take_along_axis(logits, jnp.clip(idx, 0, logits.shape[-1] - 1)[..., None], -1)[..., 0]
    return m_new, s, t, tgt + jnp.where(hit, picked, 0.0)


def chunked_target_logprobs(hidden: jax.Array, weight: jax.Array, targets: jax.Array, chunk: int,
                            return_entropy: bool = False, temperature: float = 1.0):
    """log softmax(hidden @ weight.T / temperature)[targets], f32, computed chunk by chunk over V.

    hidden: [..., H] (compute dtype); weight: [V, H] (embedding or lm_head); targets: [...] int.
    temperature: the sampling temperature (> 0) whose distribution the log-probs are under; the
    logits are f32 before the division, as in the engine's sampler.
    Returns logp [...] (and entropy [...] of the same distribution when asked).
    """
    if not temperature > 0:
        raise ValueError(f"chunked_target_logprobs: temperature must be > 0, got {temperature!r}")
    v, h = weight.shape
    chunk = max(1, min(int(chunk), v))
    n_full, rem = divmod(v, chunk)
    w = weight.astype(hidden.dtype)
    targets = targets.astype(jnp.int32)

    def chunk_step(carry, w_chunk, offset):
        logits = jnp.einsum("...h,vh->...v", hidden, w_chunk, preferred_element_type=jnp.float32)
        if temperature != 1.0:
            logits = logits / jnp.float32(temperature)
        return _update(carry, logits, targets, offset, return_entropy)

    chunk_step = jax.checkpoint(chunk_step)
    zeros = jnp.zeros(targets.shape, jnp.float32)
    carry = (jnp.full(targets.shape, _NEG, jnp.float32), zeros, zeros, zeros)
    if n_full:
        xs = (w[: n_full * chunk].reshape(n_full, chunk, h), jnp.arange(n_full, dtype=jnp.int32) * chunk)
        carry, _ = jax.lax.scan(lambda c, x: (chunk_step(c, *x), None), carry, xs)
    if rem:
        carry = chunk_step(carry, w[n_full * chunk:], jnp.int32(n_full * chunk))
    m, s, t, tgt = carry
    lse = m + jnp.log(s)
    logp = tgt - lse
    if return_entropy:
        return logp, lse - t / s
    return logp
