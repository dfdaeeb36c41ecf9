"""PPO's value side: a clipped value loss and a value head for the policy model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def clipped_value_loss(values: jax.Array, old_values: jax.Array, returns: jax.Array, clip: float):
    """0.5 max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2) per token; c = 0: no clip.

    Returns (loss [B, T], clipped [B, T] bool: tokens where the clipped term was chosen).
    """
    unclipped = jnp.square(values - returns)
    if clip <= 0:
        return 0.5 * unclipped, jnp.zeros(values.shape, bool)
    v_clip = old_values + jnp.clip(values - old_values, -clip, clip)
    clipped = jnp.square(v_clip - returns)
    return 0.5 * jnp.maximum(unclipped, clipped), clipped > unclipped


class ValueHead(nnx.Module):
    """hidden [B, T, H] -> values [B, T]: one linear layer on the model's hidden states.

    Params carry logical axis names ('embed',) for the sharding rules table. The kernel starts
    at zero so a fresh head predicts 0 and does not disturb the first PPO steps.
    """

    def __init__(self, hidden_size: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32,
                 dtype=jnp.float32):
        del rngs  # deterministic init; kept for the usual NNX constructor shape
        self.dtype = dtype
        self.kernel = nnx.Param(jnp.zeros((hidden_size,), param_dtype), out_sharding=("embed",),
                                eager_sharding=False)
        self.bias = nnx.Param(jnp.zeros((), param_dtype), out_sharding=(), eager_sharding=False)

    def __call__(self, hidden: jax.Array) -> jax.Array:
        h = hidden.astype(self.dtype)
        out = jnp.einsum("bth,h->bt", h, self.kernel[...].astype(self.dtype))
        return (out + self.bias[...].astype(self.dtype)).astype(jnp.float32)
