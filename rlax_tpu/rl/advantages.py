"""Advantage estimators on padded [B, T] arrays (data side; no gradient flows through them).

Every estimator has the signature
    fn(s, rewards[B], mask[B,T], group_ids[B], valid[B], token_rewards[B,T], values[B,T]|None)
      -> (advantages[B,T], returns[B,T] | None)
where ``rewards`` are sequence rewards (already shaped), ``token_rewards`` per-token rewards
such as a KL penalty (zeros when there are none), ``valid`` marks real (non-padding) rows.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from rlax_tpu.rl.masked import group_ids_from_size, group_stats, masked_sum, whiten
from rlax_tpu.rl.registry import ADVANTAGES, KL_ESTIMATORS, register_advantage
from rlax_tpu.rl.settings import RLSettings, as_settings
from rlax_tpu.rl.shaping import overlong_penalty

# Estimators whose signal is each sample's reward against the other samples of its group: in a
# group of one every advantage is 0, so validation refuses them with rl.group_size=1.
GROUP_RELATIVE = ("grpo", "drgrpo", "rloo", "grpo_passk", "passk", "reinforce_pp_baseline")
# Estimators whose advantages are token returns whitened over the whole batch: whitened over one
# sequence they keep only where a token sits, nothing of the reward.
BATCH_WHITENED = ("reinforce_pp",)


class AdvantageResult(NamedTuple):
    advantages: jax.Array  # [B, T], zero outside the mask
    returns: jax.Array | None  # [B, T] value targets (GAE) or None
    rewards: jax.Array  # [B] sequence rewards after shaping (and KL-in-reward, summed)


def _broadcast(seq: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.where(mask, seq[:, None], 0.0)


def _seq_rewards(rewards: jax.Array, mask: jax.Array, token_rewards: jax.Array) -> jax.Array:
    # Outcome estimators see a per-token penalty as its sum over the sequence.
    return rewards + masked_sum(token_rewards, mask, axis=-1)


def _outcome_token_rewards(rewards, mask, token_rewards):
    """Per-token rewards with the sequence reward on the last valid token."""
    t = jnp.arange(mask.shape[1])
    last = jnp.max(jnp.where(mask, t, -1), axis=-1)
    outcome = jnp.where(t[None, :] == last[:, None], rewards[:, None], 0.0)
    return jnp.where(mask, outcome + token_rewards, 0.0)


def discounted_returns(token_rewards: jax.Array, mask: jax.Array, gamma: float) -> jax.Array:
    """G_t = r_t + gamma * G_next over the masked tokens of each row (gaps are skipped)."""

    def step(g, x):
        r, m = x
        g = jnp.where(m, r + gamma * g, g)
        return g, jnp.where(m, g, 0.0)

    _, out = jax.lax.scan(step, jnp.zeros(mask.shape[0], token_rewards.dtype),
                          (token_rewards.T, mask.T), reverse=True)
    return out.T


def gae(token_rewards: jax.Array, values: jax.Array, mask: jax.Array, gamma: float, lam: float):
    """Generalized advantage estimation over masked tokens (Schulman et al., 2015).

    delta_t = r_t + gamma V_next - V_t, A_t = delta_t + gamma lam A_next, where "next" is the
    next masked token of the row (V = 0 after the last one). Returns (advantages, returns).
    """

    def step(carry, x):
        next_v, next_a = carry
        r, v, m = x
        a = r + gamma * next_v - v + gamma * lam * next_a
        carry = (jnp.where(m, v, next_v), jnp.where(m, a, next_a))
        return carry, jnp.where(m, a, 0.0)

    zeros = jnp.zeros(mask.shape[0], jnp.float32)
    _, adv = jax.lax.scan(step, (zeros, zeros), (token_rewards.T, values.T, mask.T), reverse=True)
    adv = adv.T
    return adv, jnp.where(mask, adv + values, 0.0)


@register_advantage("grpo")
def grpo(s: RLSettings, rewards, mask, group_ids, valid, token_rewards, values=None):
    """A_i = (r_i - mean_g r) / (std_g r + eps) (DeepSeekMath, arXiv 2402.03300)."""
    r = _seq_rewards(rewards, mask, token_rewards)
    _, mean, std = group_stats(r, group_ids, valid)
    return _broadcast((r - mean) / (std + s.adv_eps), mask), None


@register_advantage("drgrpo")
def drgrpo(s: RLSettings, rewards, mask, group_ids, valid, token_rewards, values=None):
    """A_i = r_i - mean_g r (Dr.GRPO, arXiv 2503.20783: no std normalization)."""
    r = _seq_rewards(rewards, mask, token_rewards)
    _, mean, _ = group_stats(r, group_ids, valid)
    return _broadcast(r - mean, mask), None


@register_advantage("rloo")
def rloo(s: RLSettings, rewards, mask, group_ids, valid, token_rewards, values=None):
    """A_i = r_i - mean_{j != i} r_j (Ahmadian et al., arXiv 2402.14740); 0 for a group of 1."""
    r = _seq_rewards(rewards, mask, token_rewards)
    count, mean, _ = group_stats(r, group_ids, valid)
    others = (mean * count - r) / jnp.maximum(count - 1.0, 1.0)
    return _broadcast(jnp.where(count > 1, r - others, 0.0), mask), None


@register_advantage("reinforce_pp")
def reinforce_pp(s: RLSettings, rewards, mask, group_ids, valid, token_rewards, values=None):
    """REINFORCE++ (arXiv 2501.03262): discounted token returns, whitened over the batch."""
    g = discounted_returns(_outcome_token_rewards(rewards, mask, token_rewards), mask, s.gamma)
    return whiten(g, mask, s.adv_eps), None


@register_advantage("reinforce_pp_baseline")
def reinforce_pp_baseline(s: RLSettings, rewards, mask, group_ids, valid, token_rewards, values=None):
    """REINFORCE++-baseline: the group-mean baseline on the reward, then the batch's token mean
    and std (as the reference implementations, OpenRLHF and verl, whiten): without re-centering,
    when reward correlates with length the token mean is off zero and every token gets a constant
    push."""
    _, mean, _ = group_stats(rewards, group_ids, valid)
    outcome = _outcome_token_rewards(rewards - mean, mask, token_rewards)
    g = discounted_returns(outcome, mask, s.gamma)
    return whiten(g, mask, s.adv_eps), None


@register_advantage("grpo_passk")
def grpo_passk(s: RLSettings, rewards, mask, group_ids, valid, token_rewards, values=None):
    """Pass@k-aware GRPO (arXiv 2503.19595, verl's grpo_passk): only each group's best sample
    (the first, on ties) gets an advantage, (r_max - r_second) / (std_g + eps); the rest get 0.
    A prompt already solved twice teaches nothing more, so the update favours rare successes and
    leaves the spread of the other samples alone (pass@k is kept, not traded for pass@1)."""
    r = _seq_rewards(rewards, mask, token_rewards)
    b = r.shape[0]
    rows = jnp.arange(b)
    neg = jnp.float32(-jnp.inf)
    r_valid = jnp.where(valid, r, neg)
    best = jax.ops.segment_max(r_valid, group_ids, num_segments=b)[group_ids]
    first = jax.ops.segment_min(jnp.where(valid & (r_valid == best), rows, b), group_ids, num_segments=b)
    is_best = rows == first[group_ids]
    second = jax.ops.segment_max(jnp.where(is_best, neg, r_valid), group_ids, num_segments=b)[group_ids]
    count, _, std = group_stats(r, group_ids, valid)
    adv = jnp.where(is_best & (count > 1), (best - second) / (std + s.adv_eps), 0.0)
    return _broadcast(adv, mask), None


def _max_of_k_weights(n: int, k: int):
    """w_j = C(j-1, k-1) / C(n, k) for j = 1..n: the probability that the j-th smallest of n
    values is the largest of k drawn without replacement (0 where j < k)."""
    from math import comb

    return jnp.asarray([comb(j - 1, k - 1) / comb(n, k) for j in range(1, n + 1)], jnp.float32)


@register_advantage("passk")
def passk(s: RLSettings, rewards, mask, group_ids, valid, token_rewards, values=None):
    """Each sample's leave-one-out share of its group's pass@k (for 0/1 rewards; the expected
    best of k in general): E_n[max of k] - E_{n-1 without i}[max of k], both the unbiased
    estimators from the group's n samples, over the group std. A correct sample gains most when
    few of its group succeed and almost nothing when most do, and wrong samples are pushed down
    only as far as they cost the group's pass@k: training for pass@k rather than pass@1 keeps
    the policy's spread (Pass@k training, arXiv 2508.10751; PKPO, Walder & Karkhanis 2025).
    Groups are contiguous rows of rl.group_size; k is rl.passk_k < group_size."""
    r = _seq_rewards(rewards, mask, token_rewards)
    b, n = r.shape[0], s.group_size
    k = max(1, min(s.passk_k, n - 1))  # validation keeps k < group_size; a caller's smaller group too
    g = r.reshape(b // n, n)
    order = jnp.argsort(g, axis=-1, stable=True)
    srt = jnp.take_along_axis(g, order, axis=-1)  # ascending
    full = jnp.sum(_max_of_k_weights(n, k) * srt, axis=-1, keepdims=True)
    w = _max_of_k_weights(n - 1, k)  # weights of the n-1 values left when one is removed
    # Removing the value at sorted position p leaves srt[:p] then srt[p+1:]: prefix and suffix sums.
    before = jnp.cumsum(w * srt[:, :-1], axis=-1)  # sum_{j<=q} w_j srt_j
    after = jnp.cumsum((w * srt[:, 1:])[:, ::-1], axis=-1)[:, ::-1]  # sum_{j>=q} w_j srt_{j+1}
    zero = jnp.zeros((g.shape[0], 1), jnp.float32)
    loo_sorted = jnp.concatenate([zero, before], -1) + jnp.concatenate([after, zero], -1)
    loo = jnp.zeros_like(g).at[jnp.arange(g.shape[0])[:, None], order].set(loo_sorted)
    _, _, std = group_stats(r, group_ids, valid)
    adv = (full - loo).reshape(b) / (std + s.adv_eps)
    return _broadcast(jnp.where(valid, adv, 0.0), mask), None


@register_advantage("gae")
def gae_advantage(s: RLSettings, rewards, mask, group_ids, valid, token_rewards, values=None):
    """GAE(gamma, lambda) with the value head's rollout-time values (PPO)."""
    if values is None:
        raise ValueError("rl.advantage='gae' needs values [B, T] (batch key 'old_values')")
    return gae(_outcome_token_rewards(rewards, mask, token_rewards), values, mask, s.gamma,
               s.gae_lambda)


def compute_advantages(
    cfg: Any,
    rewards: jax.Array,
    group_size: int | None,
    mask: jax.Array,
    *,
    group_ids: jax.Array | None = None,
    values: jax.Array | None = None,
    logp: jax.Array | None = None,
    ref_logp: jax.Array | None = None,
    lengths: jax.Array | None = None,
    sample_mask: jax.Array | None = None,
) -> AdvantageResult:
    """Shapes rewards and runs the configured estimator (config field rl.advantage).

    rewards: [B] sequence rewards; mask: [B, T] completion tokens; group_size: samples per
    prompt in contiguous rows (None: cfg.group_size), or explicit group_ids: [B] int in [0, B).
    values: [B, T] rollout-time values (GAE). logp / ref_logp: [B, T] rollout and reference
    log-probs, needed when rl.kl_mode == 'reward'. lengths: [B] completion lengths for the
    overlong penalty (default: mask.sum(-1)). sample_mask: [B] real rows (default: any token).
    """
    s = as_settings(cfg)
    if group_size and group_size != s.group_size:  # estimators that need the size read it from s
        s = dataclasses.replace(s, group_size=int(group_size))
    mask = mask.astype(bool)
    rewards = jnp.asarray(rewards, jnp.float32)
    b = mask.shape[0]
    if group_ids is None:
        group_ids = group_ids_from_size(b, s.group_size)
    valid = jnp.any(mask, axis=-1) if sample_mask is None else sample_mask.astype(bool)
    if s.overlong_buffer > 0:
        lengths = jnp.sum(mask, axis=-1) if lengths is None else lengths
        rewards = rewards + overlong_penalty(lengths, s.overlong_max_len, s.overlong_buffer,
                                             s.overlong_penalty)
    token_rewards = jnp.zeros(mask.shape, jnp.float32)
    if s.kl_mode == "reward" and s.kl_coef > 0:
        if logp is None or ref_logp is None:
            raise ValueError("rl.kl_mode='reward' needs the rollout logp and ref_logp [B, T]")
        kl = KL_ESTIMATORS.get(s.kl_estimator)(logp, ref_logp)
        token_rewards = jnp.where(mask, -s.kl_coef * kl, 0.0)
    fn = ADVANTAGES.get(s.advantage)
    adv, returns = fn(s, rewards, mask, group_ids, valid, token_rewards, values)
    if s.whiten_advantages != "none":
        adv = whiten(adv, mask, s.adv_eps, shift_mean=s.whiten_advantages == "batch")
    adv = jax.lax.stop_gradient(adv)
    returns = None if returns is None else jax.lax.stop_gradient(returns)
    return AdvantageResult(adv, returns, _seq_rewards(rewards, mask, token_rewards))


def with_advantages(cfg: Any, batch: dict) -> dict:
    """The batch with 'advantages' (and 'returns', 'shaped_rewards') from its 'rewards', computed
    on the whole batch (groups are whole there) from the rollout-time log-probs and values: what
    the loss consumes."""
    s = as_settings(cfg)
    if "rewards" not in batch or "mask" not in batch:
        raise KeyError("the RL batch needs 'rewards' [B] and 'mask' [B, T]")
    res = compute_advantages(
        s, batch["rewards"], None, batch["mask"], group_ids=batch.get("group_ids"),
        values=batch.get("old_values"), logp=batch.get("proximal_logp", batch.get("behavior_logp")),
        ref_logp=batch.get("ref_logp"), lengths=batch.get("lengths"), sample_mask=batch.get("sample_mask"))
    out = {**batch, "advantages": res.advantages, "shaped_rewards": res.rewards}
    if res.returns is not None:
        out["returns"] = res.returns
    return out
