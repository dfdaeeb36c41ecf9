"""The configurable RL loss: advantages + policy loss + aggregation + KL + entropy +
off-policy correction + value loss, selected by config.rl through the registries."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

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

    # Per-micro-batch metrics that are means over the loss's tokens (combined by token share);
    # the other means are aggregated like the loss (combined by the loss's shares).
    TOKEN_MEANS: ClassVar[frozenset[str]] = frozenset({
        "is_weight_mean", "is_capped_frac", "clip_frac_low", "clip_frac_high", "clip_frac",
        "dual_clip_frac", "approx_kl", "ratio_mean", "value_clip_frac", "value_mean", "returns_mean",
        "explained_variance"})

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
        data_mask = batch["mask"].astype(bool)  # before filtering: used for group statistics
        if data_mask.shape != (b, t):
            raise ValueError(f"batch['mask'] has shape {data_mask.shape}, logp has {(b, t)}")
        mask = self.loss_mask(batch)
        behavior, proximal = _old_logps(batch)
        returns = batch.get("returns")
        adv = _advantages(batch, data_mask)

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
        metrics.update(self.batch_metrics(batch))
        return loss, {k: sg(v).astype(_F32) for k, v in metrics.items()}

    def loss_mask(self, batch: dict[str, Any]) -> jax.Array:
        """The [B, T] tokens the loss aggregates over: batch['mask'] after rl.overlong_filter."""
        mask = batch["mask"].astype(bool)
        if not self.settings.overlong_filter:
            return mask
        if "truncated" not in batch:
            raise KeyError("rl.overlong_filter=True needs batch['truncated'] [B] bool")
        return overlong_filter(mask, batch["truncated"].astype(bool))

    def batch_metrics(self, batch: dict[str, Any]) -> dict[str, jax.Array]:
        """The metrics that depend on the batch alone (not on the current params): advantage
        statistics, the engine/trainer mismatch, token and sequence counts. The learner takes
        them on the whole batch when it cuts micro-batches (a group may span two)."""
        data_mask = batch["mask"].astype(bool)
        mask = self.loss_mask(batch)
        group_ids = batch.get("group_ids")
        if group_ids is None:
            group_ids = group_ids_from_size(data_mask.shape[0], self.settings.group_size)
        metrics = _advantage_metrics(_advantages(batch, data_mask), data_mask, group_ids)
        behavior, proximal = _old_logps(batch)
        if behavior is not None and proximal is not None:
            # Engine vs trainer on the same tokens: KL(behav || prox) estimated by k1 and k3.
            metrics["mismatch_kl"] = masked_mean(behavior - proximal, mask)
            metrics["mismatch_kl_k3"] = masked_mean(KL_ESTIMATORS.get("k3")(behavior, proximal), mask)
        metrics["num_tokens"] = jnp.sum(mask.astype(_F32))
        metrics["num_seqs"] = jnp.sum(jnp.any(mask, axis=-1).astype(_F32))
        return {k: sg(v).astype(_F32) for k, v in metrics.items()}

    def micro_batch_shares(self, batch: dict[str, Any], m: int) -> tuple[jax.Array, jax.Array]:
        """(loss shares [m], token shares [m]) of the batch cut into m equal row blocks, counted
        on the mask the loss uses. The loss shares make sum_i share_i * loss(block i) the whole
        batch's loss (and gradient) for any aggregation that is a weighted mean over rows' tokens
        (token_mean: the block's share of the tokens; the sequence means: of the valid
        sequences): block i's share is aggregate(1 on block i, whole batch) / aggregate(1, block
        i), 0 for a block with nothing to aggregate. Token shares weigh per-token metric means."""
        mask = self.loss_mask(batch)
        rows = mask.shape[0] // m
        ones = jnp.ones(mask.shape, _F32)
        block = jnp.arange(mask.shape[0]) // rows
        shares = []
        for i in range(m):
            whole = self.aggregate(jnp.where((block == i)[:, None], ones, 0.0), mask)
            part = self.aggregate(ones[i * rows:(i + 1) * rows], mask[i * rows:(i + 1) * rows])
            shares.append(jnp.where(part > 0, whole / jnp.where(part > 0, part, 1.0), 0.0))
        return jnp.stack(shares), token_shares(mask, m)

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


def token_shares(mask: jax.Array, m: int) -> jax.Array:
    """Each of m equal row blocks' share of the mask's tokens [m] (0 everywhere for no tokens)."""
    counts = mask.astype(_F32).reshape(m, -1).sum(axis=1)
    return counts / jnp.maximum(counts.sum(), 1.0)


def _old_logps(batch):
    behavior, proximal = batch.get("behavior_logp"), batch.get("proximal_logp")
    return (None if behavior is None else behavior.astype(_F32),
            None if proximal is None else proximal.astype(_F32))


def _advantages(batch, data_mask):
    """[B, T] advantages on the data mask (computed on the whole batch: rl.with_advantages)."""
    if "advantages" not in batch:
        raise KeyError("RL batch needs 'advantages' [B, T] (rl.with_advantages(settings, batch))")
    adv = batch["advantages"].astype(_F32)
    return sg(jnp.where(data_mask, adv[:, None] if adv.ndim == 1 else adv, 0.0))


def _is_sum(name: str) -> bool:
    last = name.rsplit("/", 1)[-1]
    return last.startswith("num_") or last == "tokens"


def combine_micro_metrics(per: list[dict[str, jax.Array]], shares: jax.Array, token_shares: jax.Array,
                          token_means=frozenset()) -> dict[str, jax.Array]:
    """Micro-batch metrics combined as their names say: counts (num_*, */tokens) summed, *_max
    maxed and *_min minned over the blocks with loss tokens, the names in ``token_means`` weighted
    by ``token_shares``, every other mean by ``shares`` (the loss's own weights)."""
    has_tokens = token_shares > 0
    any_tokens = jnp.any(has_tokens)
    out = {}
    for k in per[0]:
        vals = jnp.stack([p[k] for p in per])
        if _is_sum(k):
            out[k] = vals.sum()
        elif k.endswith("_max"):
            out[k] = jnp.where(any_tokens, jnp.max(jnp.where(has_tokens, vals, -jnp.inf)), 0.0)
        elif k.endswith("_min"):
            out[k] = jnp.where(any_tokens, jnp.min(jnp.where(has_tokens, vals, jnp.inf)), 0.0)
        else:
            out[k] = jnp.sum(vals * (token_shares if k in token_means else shares))
    return out


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
