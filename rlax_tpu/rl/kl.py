"""Per-token estimators of KL(pi || ref) from tokens sampled from pi (Schulman, 2020)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlax_tpu.rl.registry import register_kl_estimator

# Bound on |log pi - log ref| inside exp() so a single wild token cannot overflow to inf.
_MAX_LOG_RATIO = 20.0


@register_kl_estimator("k1")
def k1(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
    """log pi - log ref: unbiased, high variance, can be negative."""
    return logp - ref_logp


@register_kl_estimator("k2")
def k2(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
    """0.5 (log pi - log ref)^2: biased, low variance, non-negative."""
    return 0.5 * jnp.square(logp - ref_logp)


@register_kl_estimator("k3")
def k3(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
    """exp(x) - 1 - x with x = log ref - log pi: unbiased, low variance, non-negative."""
    x = jnp.clip(ref_logp - logp, -_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    return jnp.exp(x) - 1.0 - x
