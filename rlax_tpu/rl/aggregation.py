"""Loss aggregation: how per-token losses [B, T] become one scalar."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlax_tpu.rl.masked import masked_mean, masked_sum
from rlax_tpu.rl.registry import register_aggregation


@register_aggregation("token_mean")
def token_mean(x: jax.Array, mask: jax.Array, max_len: int = 0) -> jax.Array:
    """sum_{i,t} m x / sum_{i,t} m: every valid token of the batch weighs the same (DAPO)."""
    return masked_mean(x, mask)


@register_aggregation("seq_mean_token_mean")
def seq_mean_token_mean(x: jax.Array, mask: jax.Array, max_len: int = 0) -> jax.Array:
    """mean_i (sum_t m x / sum_t m): every sequence weighs the same (GRPO, GSPO)."""
    per_seq = masked_mean(x, mask, axis=-1)
    valid = jnp.any(mask, axis=-1)
    return masked_mean(per_seq, valid)


@register_aggregation("seq_mean_token_sum_norm")
def seq_mean_token_sum_norm(x: jax.Array, mask: jax.Array, max_len: int = 0) -> jax.Array:
    """mean_i (sum_t m x / L): Dr.GRPO's constant normalizer L (max_len, or T when 0)."""
    norm = float(max_len or x.shape[-1])
    per_seq = masked_sum(x, mask, axis=-1) / norm
    valid = jnp.any(mask, axis=-1)
    return masked_mean(per_seq, valid)
