"""String -> function registries; config strings select the parts of the loss through them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rlax_tpu.config.errors import ConfigError


class Registry:
    """A named table of functions. ``field`` is the config field that selects from it."""

    def __init__(self, field: str):
        self.field = field
        self._fns: dict[str, Callable[..., Any]] = {}

    def register(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._fns:
                raise ValueError(f"{self.field}: {name!r} is already registered")
            self._fns[name] = fn
            return fn

        return deco

    def get(self, name: str) -> Callable[..., Any]:
        if name not in self._fns:
            raise ConfigError(self.field, f"unknown {name!r}; registered: {self.names()}")
        return self._fns[name]

    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self._fns))

    def __contains__(self, name: str) -> bool:
        return name in self._fns


ADVANTAGES = Registry("rl.advantage")
POLICY_LOSSES = Registry("rl.policy_loss")
AGGREGATIONS = Registry("rl.loss_agg")
KL_ESTIMATORS = Registry("rl.kl_estimator")
OFF_POLICY = Registry("rl.off_policy")

register_advantage = ADVANTAGES.register
register_policy_loss = POLICY_LOSSES.register
register_aggregation = AGGREGATIONS.register
register_kl_estimator = KL_ESTIMATORS.register
register_off_policy = OFF_POLICY.register
