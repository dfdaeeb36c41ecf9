"""RL algorithms as pure JAX functions on padded [B, T] arrays with masks (docs/rl.md).

``build_loss(config.rl)`` gives the trainer's loss; ``compute_advantages(config.rl, ...)`` the
data side. The parts are selected by config strings through the registries below.
"""

from rlax_tpu.rl import aggregation, kl, off_policy, policy_losses  # noqa: F401  (registrations)
from rlax_tpu.rl.advantages import AdvantageResult, compute_advantages, discounted_returns, gae, with_advantages
from rlax_tpu.rl.loss import RLLoss, build_loss, combine_micro_metrics, token_shares
from rlax_tpu.rl.registry import (
    ADVANTAGES,
    AGGREGATIONS,
    KL_ESTIMATORS,
    OFF_POLICY,
    POLICY_LOSSES,
    Registry,
    register_advantage,
    register_aggregation,
    register_kl_estimator,
    register_off_policy,
    register_policy_loss,
)
from rlax_tpu.rl.settings import RLSettings, as_settings
from rlax_tpu.rl.shaping import overlong_filter, overlong_penalty
from rlax_tpu.rl.value import ValueHead, clipped_value_loss

__all__ = [
    "ADVANTAGES", "AGGREGATIONS", "KL_ESTIMATORS", "OFF_POLICY", "POLICY_LOSSES",
    "AdvantageResult", "RLLoss", "RLSettings", "Registry", "ValueHead", "as_settings",
    "build_loss", "clipped_value_loss", "combine_micro_metrics", "compute_advantages", "discounted_returns",
    "gae", "overlong_filter", "overlong_penalty", "register_advantage",
    "register_aggregation", "register_kl_estimator", "register_off_policy",
    "register_policy_loss", "token_shares", "with_advantages",
]
