"""RL settings for tests: the default config.rl with a few fields changed (off_policy 'none'
unless given: most loss tests feed on-policy data with no behavior log-probs)."""

from __future__ import annotations

from rlax_tpu import rl
from rlax_tpu.config import ConfigError, get_base_config


def settings(**overrides) -> rl.RLSettings:
    section = get_base_config().rl
    section.off_policy = "none"
    for k, v in overrides.items():
        if k not in section:
            raise ConfigError(f"rl.{k}", "no such field")
        section[k] = v
    return rl.RLSettings.from_config(section)
