"""config.trainer: optimization, checkpointing and publishing."""

import ml_collections

from rlax_tpu.config.sections._checks import positive

SECTION = "trainer"


def defaults() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # Number of RL steps.
    c.steps = 100
    # Prompts (groups) per RL step; the batch is batch_size * rl.group_size sequences.
    c.batch_size = 8
    c.learning_rate = 1e-5
    # Save an orbax checkpoint every this many steps, keeping the newest keep_checkpoints.
    c.checkpoint_every = 10
    c.keep_checkpoints = 2
    # Publish weights to the parameter server every this many steps.
    c.publish_every = 1
    c.log_every = 1
    return c


def validate(c: ml_collections.ConfigDict, config: ml_collections.ConfigDict) -> None:
    for f in ("steps", "batch_size", "checkpoint_every", "keep_checkpoints", "publish_every",
              "log_every", "learning_rate"):
        positive(SECTION, c, f)
