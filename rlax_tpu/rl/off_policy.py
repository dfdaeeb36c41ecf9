"""Off-policy correction between the behavior policy (inference engine) and the proximal
policy (the trainer's recompute of the same weights, or the "old" policy of decoupled PPO).

Signature: fn(s, proximal_logp, behavior_logp) -> (weight [B,T], capped [B,T] bool). The weight
multiplies the per-token policy loss and carries no gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlax_tpu.rl.registry import register_off_policy

_MAX_LOG_RATIO = 20.0


def behavior_ratio(proximal_logp: jax.Array, behavior_logp: jax.Array) -> jax.Array:
    """pi_prox / pi_behav per token."""
    return jnp.exp(jnp.clip(proximal_logp - behavior_logp, -_MAX_LOG_RATIO, _MAX_LOG_RATIO))


@register_off_policy("none")
def no_correction(s, proximal_logp, behavior_logp):
    """Weight 1: the PPO ratio against the proximal policy is the only correction."""
    return jnp.ones(proximal_logp.shape, jnp.float32), jnp.zeros(proximal_logp.shape, bool)


@register_off_policy("tis")
def truncated_is(s, proximal_logp, behavior_logp):
    """Truncated IS (Yao et al. 2025, "Your efficient RL framework secretly brings you
    off-policy RL training"): weight min(pi_prox / pi_behav, C)."""
    w = behavior_ratio(proximal_logp, behavior_logp)
    return jax.lax.stop_gradient(jnp.minimum(w, s.is_cap)), w > s.is_cap


@register_off_policy("decoupled")
def decoupled(s, proximal_logp, behavior_logp):
    """Decoupled PPO (Hilton et al., arXiv 2110.00641; AReaL, arXiv 2505.24298): weight
    pi_prox / pi_behav; with is_cap > 0, tokens whose weight exceeds it are dropped."""
    w = behavior_ratio(proximal_logp, behavior_logp)
    if s.is_cap > 0:
        capped = w > s.is_cap
        return jax.lax.stop_gradient(jnp.where(capped, 0.0, w)), capped
    return jax.lax.stop_gradient(w), jnp.zeros(w.shape, bool)
