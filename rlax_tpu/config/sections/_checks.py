"""Small validators shared by the sections; each raises ConfigError naming the field."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from rlax_tpu.config.errors import ConfigError


def one_of(section: str, cfg, field: str, choices: Iterable[Any]) -> None:
    choices = tuple(choices)
    if cfg[field] not in choices:
        raise ConfigError(f"{section}.{field}", f"must be one of {choices}, got {cfg[field]!r}")


def positive(section: str, cfg, field: str, allow_zero: bool = False) -> None:
    value = cfg[field]
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (value >= 0 if allow_zero else value > 0)
    if not ok:
        kind = "non-negative" if allow_zero else "positive"
        raise ConfigError(f"{section}.{field}", f"must be {kind}, got {value!r}")


def in_range(section: str, cfg, field: str, lo: float, hi: float) -> None:
    value = cfg[field]
    if not (isinstance(value, (int, float)) and lo <= value <= hi):
        raise ConfigError(f"{section}.{field}", f"must be in [{lo}, {hi}], got {value!r}")


def require(cond: bool, field: str, message: str) -> None:
    if not cond:
        raise ConfigError(field, message)
