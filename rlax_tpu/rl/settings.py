"""A frozen, hashable copy of config.rl: static under jax.jit, plain data across processes."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class RLSettings:
    """The fields of config.rl (documented in rlax_tpu/config/sections/rl.py)."""

    group_size: int = 8
    max_staleness: int = 1
    advantage: str = "grpo"
    adv_eps: float = 1e-6
    whiten_advantages: str = "none"
    gamma: float = 1.0
    gae_lambda: float = 0.95
    policy_loss: str = "ppo"
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2
    dual_clip_c: float = 0.0
    loss_agg: str = "token_mean"
    agg_max_len: int = 0
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    kl_mode: str = "loss"
    entropy_coef: float = 0.0
    off_policy: str = "none"
    is_cap: float = 2.0
    value_coef: float = 0.5
    value_clip: float = 0.2
    overlong_buffer: int = 0
    overlong_max_len: int = 0
    overlong_penalty: float = 1.0
    overlong_filter: bool = False
    dynamic_sampling: bool = False

    @property
    def uses_values(self) -> bool:
        return self.advantage == "gae"


def as_settings(cfg: Any) -> RLSettings:
    """Accepts an RLSettings, a config.rl ConfigDict or a plain dict.

    A ConfigDict may carry rl.* fields that other parts (e.g. the controller) read; those are
    ignored here. A plain dict must name only loss fields (typos fail).
    """
    if isinstance(cfg, RLSettings):
        return cfg
    names = {f.name for f in dataclasses.fields(RLSettings)}
    if hasattr(cfg, "to_dict"):
        items = {k: v for k, v in cfg.to_dict().items() if k in names}
    else:
        items = dict(cfg)
    unknown = sorted(set(items) - names)
    if unknown:
        from rlax_tpu.config.errors import ConfigError

        raise ConfigError(f"rl.{unknown[0]}", "no such field")
    return RLSettings(**items)
