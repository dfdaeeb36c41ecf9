"""Masked reductions over padded [B, T] arrays and per-group statistics over [B] arrays."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def masked_sum(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
    return jnp.sum(jnp.where(mask, x, 0.0), axis=axis)


def masked_mean(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
    """Mean over the positions where mask is set; 0 where there are none (never NaN)."""
    count = jnp.sum(mask.astype(jnp.float32), axis=axis)
    return masked_sum(x, mask, axis) / jnp.maximum(count, 1.0)


def _stable_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Masked mean with one correction pass: mean + mean(x - mean).

    When the values sit far from zero relative to their spread (all rewards ~1 with small
    per-token KL terms), the first pass's rounding depends on summation order, i.e. on how
    much padding the batch carries; whitening divides that error by a small std. The
    correction pass sums the small residuals, so the result no longer depends on padding.
    """
    mean = masked_mean(x, mask)
    return mean + masked_mean(x - mean, mask)


def masked_var(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Population variance over all masked positions."""
    mean = _stable_mean(x, mask)
    return masked_mean(jnp.square(x - mean), mask)


def masked_max(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Max over the masked positions; 0 when there are none."""
    return jnp.where(jnp.any(mask), jnp.max(jnp.where(mask, x, -jnp.inf)), 0.0)


def masked_min(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Min over the masked positions; 0 when there are none."""
    return jnp.where(jnp.any(mask), jnp.min(jnp.where(mask, x, jnp.inf)), 0.0)


def whiten(x: jax.Array, mask: jax.Array, eps: float, shift_mean: bool = True) -> jax.Array:
    """(x - mean) / (std + eps) over the masked positions; zero outside the mask."""
    mean = _stable_mean(x, mask)  # the same ops as masked_var's: XLA computes it once
    std = jnp.sqrt(masked_var(x, mask))
    out = (x - mean) if shift_mean else x
    return jnp.where(mask, out / (std + eps), 0.0)


def group_ids_from_size(batch: int, group_size: int) -> jax.Array:
    """Contiguous groups: rows [k*G, (k+1)*G) form group k."""
    if batch % group_size:
        raise ValueError(f"batch size {batch} is not a multiple of rl.group_size={group_size}; "
                         "pass explicit 'group_ids'")
    return jnp.arange(batch, dtype=jnp.int32) // group_size


def group_sum(x: jax.Array, group_ids: jax.Array, valid: jax.Array) -> jax.Array:
    """Per-row sum over that row's group, counting valid rows only. x, group_ids, valid: [B]."""
    b = x.shape[0]
    sums = jax.ops.segment_sum(jnp.where(valid, x, 0.0), group_ids, num_segments=b)
    return sums[group_ids]


def group_stats(x: jax.Array, group_ids: jax.Array, valid: jax.Array):
    """Per-row (count, mean, population std) of the row's group over valid rows."""
    count = group_sum(jnp.ones_like(x), group_ids, valid)
    mean = group_sum(x, group_ids, valid) / jnp.maximum(count, 1.0)
    var = group_sum(jnp.square(x - mean), group_ids, valid) / jnp.maximum(count, 1.0)
    return count, mean, jnp.sqrt(var)
