"""Reward shaping and sample filtering on the data side (DAPO, arXiv 2503.14476). Dynamic
sampling (dropping zero-variance groups) happens where groups are admitted: trainer.controller."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def overlong_penalty(lengths: jax.Array, max_len: int, buffer: int, penalty: float = 1.0) -> jax.Array:
    """DAPO soft overlong punishment, added to the reward. lengths: [B] completion lengths.

    0 for L <= max_len - buffer; -penalty * (L - (max_len - buffer)) / buffer inside the buffer;
    -penalty beyond max_len.
    """
    if buffer <= 0:
        return jnp.zeros(lengths.shape, jnp.float32)
    start = max_len - buffer
    excess = jnp.clip(lengths.astype(jnp.float32) - start, 0.0, float(buffer))
    return -penalty * excess / buffer


def overlong_filter(mask: jax.Array, truncated: jax.Array) -> jax.Array:
    """Overlong filtering: truncated completions ([B] bool) keep no loss tokens."""
    return jnp.logical_and(mask, jnp.logical_not(truncated)[:, None])
