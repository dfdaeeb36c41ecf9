"""Per-token policy losses. Each returns (loss [B,T], ratio [B,T], flags).

Signature: fn(s, logp, old_logp, advantages, mask) where logp is the current policy's
differentiable log-prob of each sampled token, old_logp the proximal ("old") policy's and
advantages [B, T]. flags holds boolean [B, T] arrays: clipped_low / clipped_high (tokens
whose gradient the clip removed, or for CISPO whose weight was truncated) and dual_clipped.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlax_tpu.rl.masked import masked_mean
from rlax_tpu.rl.registry import register_policy_loss
from rlax_tpu.rl.settings import RLSettings

# exp() argument bound: a ratio beyond e^20 is already clipped; this only avoids inf * 0.
_MAX_LOG_RATIO = 20.0

sg = jax.lax.stop_gradient


def _ratio(logp, old_logp):
    return jnp.exp(jnp.clip(logp - old_logp, -_MAX_LOG_RATIO, _MAX_LOG_RATIO))


def _clipped_surrogate(s: RLSettings, ratio, adv, dual_clip_c: float):
    lo, hi = 1.0 - s.clip_eps_low, 1.0 + s.clip_eps_high
    loss = jnp.maximum(-adv * ratio, -adv * jnp.clip(ratio, lo, hi))
    flags = {
        "clipped_low": (ratio < lo) & (adv < 0),
        "clipped_high": (ratio > hi) & (adv > 0),
    }
    if dual_clip_c > 0:
        dual = (adv < 0) & (ratio > dual_clip_c)
        loss = jnp.where(adv < 0, jnp.minimum(loss, -adv * dual_clip_c), loss)
        flags["dual_clipped"] = dual
    else:
        flags["dual_clipped"] = jnp.zeros_like(flags["clipped_low"])
    return loss, flags


@register_policy_loss("ppo")
def ppo(s: RLSettings, logp, old_logp, adv, mask):
    """max(-A r, -A clip(r, 1-eps_low, 1+eps_high)), r = pi/pi_old; dual clip: min(., -c A) for A<0.

    PPO (arXiv 1707.06347); clip-higher from DAPO (arXiv 2503.14476); dual clip from
    Ye et al. (arXiv 1912.09729).
    """
    ratio = _ratio(logp, old_logp)
    loss, flags = _clipped_surrogate(s, ratio, adv, s.dual_clip_c)
    return loss, ratio, flags


@register_policy_loss("gspo")
def gspo(s: RLSettings, logp, old_logp, adv, mask):
    """GSPO (arXiv 2507.18071): the clipped surrogate on s_i = exp(mean_t log r_t).

    Token form s_it = sg(s_i) * pi_t / sg(pi_t): its value is s_i and, aggregated with
    seq_mean_token_mean, its gradient equals the sequence-level GSPO gradient.
    """
    seq_log_ratio = masked_mean(logp - old_logp, mask, axis=-1)
    seq_log_ratio = jnp.clip(sg(seq_log_ratio), -_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    ratio = jnp.exp(seq_log_ratio[:, None] + logp - sg(logp))
    loss, flags = _clipped_surrogate(s, ratio, adv, 0.0)
    return loss, ratio, flags


@register_policy_loss("cispo")
def cispo(s: RLSettings, logp, old_logp, adv, mask):
    """CISPO (MiniMax-M1, arXiv 2506.13585): -sg(clip(r, 1-eps_low, 1+eps_high)) * A * log pi.

    The importance weight is clipped and carries no gradient, so every token keeps a gradient.
    """
    ratio = _ratio(logp, old_logp)
    lo, hi = 1.0 - s.clip_eps_low, 1.0 + s.clip_eps_high
    weight = sg(jnp.clip(ratio, lo, hi))
    flags = {
        "clipped_low": ratio < lo,
        "clipped_high": ratio > hi,
        "dual_clipped": jnp.zeros(ratio.shape, bool),
    }
    return -weight * adv * logp, ratio, flags


@register_policy_loss("reinforce")
def reinforce(s: RLSettings, logp, old_logp, adv, mask):
    """Vanilla policy gradient (Williams, 1992): -A * log pi."""
    ratio = _ratio(logp, old_logp)
    no = jnp.zeros(ratio.shape, bool)
    return -adv * logp, ratio, {"clipped_low": no, "clipped_high": no, "dual_clipped": no}
