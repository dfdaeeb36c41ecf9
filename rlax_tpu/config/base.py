"""The base config: every field of every section, with its default and documentation."""

from __future__ import annotations

import ml_collections

from rlax_tpu.config import sections

SECTION_NAMES = (
    "model", "lora", "tokenizer", "task", "mesh", "sft", "rl", "trainer", "inference", "store", "eval",
    "launch", "replay", "sandbox", "env",
)


def get_base_config() -> ml_collections.ConfigDict:
    """Returns an unlocked ConfigDict with all sections at their defaults."""
    config = ml_collections.ConfigDict()
    # Global seed; every role derives its own RNG streams from it (see each section).
    config.seed = 0
    # Experiment name: recorded in <workdir>/config.json and shown by rlax_tpu.report (its table
    # and the plot's title).
    config.name = "experiment"
    for name in SECTION_NAMES:
        config[name] = getattr(sections, name).defaults()
    return config
