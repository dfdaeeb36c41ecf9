"""Start-up validation of a whole config; each section checks its own fields."""

from __future__ import annotations

import ml_collections

from rlax_tpu.config import sections
from rlax_tpu.config.base import SECTION_NAMES
from rlax_tpu.config.errors import ConfigError


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError naming the first bad field; returns None if the config is usable."""
    for name in SECTION_NAMES:
        if name not in config:
            raise ConfigError(name, "section is missing (start from rlax_tpu.config.get_base_config())")
        getattr(sections, name).validate(config[name], config)
    if not isinstance(config.seed, int) or config.seed < 0:
        raise ConfigError("seed", f"must be a non-negative int, got {config.seed!r}")
