"""RLSettings: the loss's fields of config.rl, frozen (static under jax.jit, plain data).

The section (rlax_tpu/config/sections/rl.py) is the one place that defines and documents them;
this dataclass has no defaults of its own.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class RLSettings:
    """The loss's fields of config.rl (documented in rlax_tpu/config/sections/rl.py)."""

    group_size: int
    advantage: str
    adv_eps: float
    passk_k: int
    whiten_advantages: str
    gamma: float
    gae_lambda: float
    policy_loss: str
    clip_eps_low: float
    clip_eps_high: float
    dual_clip_c: float
    loss_agg: str
    agg_max_len: int
    kl_coef: float
    kl_estimator: str
    kl_mode: str
    entropy_coef: float
    off_policy: str
    is_cap: float
    value_coef: float
    value_clip: float
    overlong_buffer: int
    overlong_max_len: int
    overlong_penalty: float
    overlong_filter: bool

    @property
    def uses_values(self) -> bool:
        return self.advantage == "gae"

    @classmethod
    def from_config(cls, rl_section) -> RLSettings:
        """From a config.rl section (its other fields, read by the controller, are left out)."""
        return cls(**{f.name: rl_section[f.name] for f in dataclasses.fields(cls)})


def as_settings(cfg: Any) -> RLSettings:
    """An RLSettings from an RLSettings, a config.rl ConfigDict or a dict naming every field."""
    if isinstance(cfg, RLSettings):
        return cfg
    if hasattr(cfg, "to_dict"):
        return RLSettings.from_config(cfg)
    fields = {f.name for f in dataclasses.fields(RLSettings)}
    unknown = sorted(set(cfg) - fields)
    if unknown:
        from rlax_tpu.config.errors import ConfigError

        raise ConfigError(f"rl.{unknown[0]}", "no such loss field")
    return RLSettings(**dict(cfg))
