"""config.sft: supervised warm start on prompt -> answer traces (prompt tokens masked)."""

import ml_collections

from rlax_tpu.config.sections._checks import positive

SECTION = "sft"


def defaults() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # SFT steps before RL; 0 skips SFT (e.g. when starting from an instruct checkpoint).
    c.steps = 0
    c.batch_size = 32
    c.learning_rate = 1e-3
    c.warmup_steps = 20
    # Maximum trace length (prompt + answer) in tokens.
    c.max_len = 128
    return c


def validate(c: ml_collections.ConfigDict, config: ml_collections.ConfigDict) -> None:
    positive(SECTION, c, "steps", allow_zero=True)
    positive(SECTION, c, "batch_size")
    positive(SECTION, c, "learning_rate")
    positive(SECTION, c, "warmup_steps", allow_zero=True)
    positive(SECTION, c, "max_len")
