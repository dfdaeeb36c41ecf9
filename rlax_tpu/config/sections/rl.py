"""config.rl: the RL objective (advantages, policy loss, KL, off-policy correction)."""

import ml_collections

from rlax_tpu.config.sections._checks import positive

SECTION = "rl"


def defaults() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # Samples per prompt (the GRPO group size).
    c.group_size = 8
    # A rollout from policy version v is admitted at trainer step s only if s - v <= this.
    # 0 is strictly on-policy.
    c.max_staleness = 1
    return c


def validate(c: ml_collections.ConfigDict, config: ml_collections.ConfigDict) -> None:
    positive(SECTION, c, "group_size")
    positive(SECTION, c, "max_staleness", allow_zero=True)
