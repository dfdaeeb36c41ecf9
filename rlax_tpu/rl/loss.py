"""The configurable RL loss: advantages + policy loss + aggregation + KL + entropy +
off-policy correction + value loss, selected by config.rl through the registries."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from rlax_tpu.rl.masked import (
    group_ids_from_size,
    group_sum,
    masked_max,
    masked_mean,
    masked_min,
    masked_var,
)
from rlax_tpu.rl.registry import ADVANTAGES, AGGREGATIONS, KL_ESTIMATORS, OFF_POLICY, POLICY_LOSSES
from rlax_tpu.rl.settings import RLSettings, as_settings
from rlax_tpu.rl.shaping import overlong_filter
from rlax_tpu.rl.value import clipped_value_loss

sg = jax.lax.stop_gradient
_F32 = jnp.float32


def _frac(flag, mask):
    return masked_mean(flag.astype(_F32), mask)


@dataclasses.dataclass(frozen=True)
class RLLoss:
    """``loss_fn(logp, batch, *, values=None, entropy=None) -> (loss, metrics)``.

    Hashable and static under jax.jit. Build it with ``build_loss(config.rl)``.
    """

    settings: RLSettings

    def __post_init__(self):
        s = self.settings
        # Resolve every name now so a bad config fails at build time, naming the field.
        for reg, name in ((ADVANTAGES, s.advantage), (POLICY_LOSSES, s.policy_loss),
                          (AGGREGATIONS, s.loss_agg), (KL_ESTIMATORS, s.kl_estimator),
                          (OFF_POLICY, s.off_policy)):
            reg.get(name)

    def aggregate(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        return AGGREGATIONS.get(self.settings.loss_agg)(x, mask, self.settings.agg_max_len)

    def __call__(self, logp: jax.Array, batch: dict[str, Any], *, values: jax.Array | None = None,
                 entropy: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
        s = self.settings
        logp = logp.astype(_F32)
        b, t = logp.shape
        if "mask" not in batch:
            raise KeyError("RL batch needs 'mask' [B, T] (completion tokens)")
        mask = batch["mask"].astype(bool)
        if mask.shape != (b, t):
            raise ValueError(f"batch['mask'] has shape {mask.shape}, logp has {(b, t)}")
        data_mask = mask  # before filtering: used for group statistics
        if s.overlong_filter and "truncated" in batch:
            mask = overlong_filter(mask, batch["truncated"].astype(bool))
        elif s.overlong_filter:
            raise KeyError("rl.overlong_filter=True needs batch['truncated'] [B] bool")
        group_ids = batch.get("group_ids")
        if group_ids is None:
            group_ids = group_ids_from_size(b, s.group_size)

        behavior = batch.get("behavior_logp")
        proximal = batch.get("proximal_logp")
        behavior = None if behavior is None else behavior.astype(_F32)
        proximal = None if proximal is None else proximal.astype(_F32)

        # Advantages come from the data side (rl.with_advantages, on the whole batch).
        returns = batch.get("returns")
        if "advantages" not in batch:
            raise KeyError("RL batch needs 'advantages' [B, T] (rl.with_advantages(settings, batch))")
        adv = batch["advantages"].astype(_F32)
        adv = sg(jnp.where(data_mask, adv[:, None] if adv.ndim == 1 else adv, 0.0))

        # The ratio's denominator: the proximal policy, else the behavior policy, else on-policy.
        old = proximal if proximal is not None else behavior
        old = sg(logp) if old is None else old
        pg_tok, ratio, flags = POLICY_LOSSES.get(s.policy_loss)(s, logp, old, adv, mask)

        metrics: dict[str, jax.Array] = {}
        if s.off_policy != "none":
            if behavior is None or proximal is None:
                raise KeyError(f"rl.off_policy={s.off_policy!r} needs batch['behavior_logp'] and "
                               "batch['proximal_logp'] [B, T]")
            weight, capped = OFF_POLICY.get(s.off_policy)(s, proximal, behavior)
            pg_tok = pg_tok * weight
            metrics["is_weight_mean"] = masked_mean(weight, mask)
            metrics["is_weight_max"] = masked_max(weight, mask)
            metrics["is_capped_frac"] = _frac(capped, mask)

        pg_loss = self.aggregate(pg_tok, mask)
        loss = pg_loss
        metrics["pg_loss"] = pg_loss

        ref = batch.get("ref_logp")
        if ref is not None:
            kl_tok = KL_ESTIMATORS.get(s.kl_estimator)(logp, ref.astype(_F32))
            kl_ref = self.aggregate(kl_tok, mask)
            metrics["kl_ref"] = sg(kl_ref)
            if s.kl_mode == "loss" and s.kl_coef > 0:
                loss = loss + s.kl_coef * kl_ref
        elif s.kl_mode == "loss" and s.kl_coef > 0:
            raise KeyError("rl.kl_coef > 0 with kl_mode='loss' needs batch['ref_logp'] [B, T]")

        if entropy is not None:
            ent = self.aggregate(entropy.astype(_F32), mask)
            metrics["entropy"] = sg(ent)
            if s.entropy_coef > 0:
                loss = loss - s.entropy_coef * ent
        elif s.entropy_coef > 0:
            raise ValueError("rl.entropy_coef > 0 needs loss_fn(..., entropy=[B, T])")

        if s.uses_values:
            if values is None:
                raise ValueError("rl.advantage='gae' needs loss_fn(..., values=[B, T]) from the "
                                 "value head")
            if returns is None or "old_values" not in batch:
                raise KeyError("the value loss needs batch['old_values'] and 'returns' [B, T]")
            old_values = batch["old_values"].astype(_F32)
            v_tok, v_clipped = clipped_value_loss(values.astype(_F32), old_values,
                                                  sg(returns.astype(_F32)), s.value_clip)
            v_loss = self.aggregate(v_tok, mask)
            loss = loss + s.value_coef * v_loss
            ret = returns.astype(_F32)
            metrics["value_loss"] = v_loss
            metrics["value_clip_frac"] = _frac(v_clipped, mask)
            metrics["value_mean"] = masked_mean(values.astype(_F32), mask)
            metrics["returns_mean"] = masked_mean(ret, mask)
            metrics["explained_variance"] = 1.0 - masked_var(ret - values, mask) / (
                masked_var(ret, mask) + 1e-8)

        metrics["loss"] = loss
        metrics.update(self._policy_metrics(logp, old, ratio, flags, mask))
        metrics.update(_advantage_metrics(adv, data_mask, group_ids))
        if behavior is not None and proximal is not None:
            # Engine vs trainer on the same tokens: KL(behav || prox) estimated by k1 and k3.
            metrics["mismatch_kl"] = masked_mean(behavior - proximal, mask)
            metrics["mismatch_kl_k3"] = masked_mean(
                KL_ESTIMATORS.get("k3")(behavior, proximal), mask)
        metrics["num_tokens"] = jnp.sum(mask.astype(_F32))
        metrics["num_seqs"] = jnp.sum(jnp.any(mask, axis=-1).astype(_F32))
        return loss, {k: sg(v).astype(_F32) for k, v in metrics.items()}

    def _policy_metrics(self, logp, old, ratio, flags, mask):
        ratio = sg(ratio)
        return {
            "clip_frac_low": _frac(flags["clipped_low"], mask),
            "clip_frac_high": _frac(flags["clipped_high"], mask),
            "clip_frac": _frac(flags["clipped_low"] | flags["clipped_high"], mask),
            "dual_clip_frac": _frac(flags["dual_clipped"], mask),
            # KL(old || current) by the k3 estimator on tokens sampled from old.
            "approx_kl": masked_mean(KL_ESTIMATORS.get("k3")(sg(old), sg(logp)), mask),
            "ratio_mean": masked_mean(ratio, mask),
            "ratio_max": masked_max(ratio, mask),
        }


def _advantage_metrics(adv, mask, group_ids):
    valid = jnp.any(mask, axis=-1)
    seq_zero = jnp.all(jnp.where(mask, jnp.abs(adv) < 1e-8, True), axis=-1)
    # A group counts as zero-advantage when all its valid sequences have zero advantage.
    nonzero = group_sum(jnp.where(seq_zero, 0.0, 1.0), group_ids, valid)
    size = group_sum(jnp.ones(valid.shape, _F32), group_ids, valid)
    # Count each group once: weight each of its valid rows by 1 / size.
    per_row = jnp.where(valid, 1.0 / jnp.maximum(size, 1.0), 0.0)
    n_groups = jnp.sum(per_row)
    zero_groups = jnp.sum(jnp.where(nonzero == 0, per_row, 0.0))
    return {
        "adv_mean": masked_mean(adv, mask),
        "adv_std": jnp.sqrt(masked_var(adv, mask)),
        "adv_min": masked_min(adv, mask),
        "adv_max": masked_max(adv, mask),
        "zero_adv_group_frac": zero_groups / jnp.maximum(n_groups, 1.0),
    }


def build_loss(cfg: Any) -> RLLoss:
    """config.rl (ConfigDict, dict or RLSettings) -> the loss callable; bad names raise
    ConfigError naming the field (e.g. config.rl.policy_loss)."""
    return RLLoss(as_settings(cfg))
