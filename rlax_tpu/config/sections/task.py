"""config.task: the prompts and their verifiable rewards."""

import ml_collections

from rlax_tpu.config.sections._checks import positive, require

SECTION = "task"


def defaults() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # Task name from the rlax_tpu.tasks registry ('arith', 'countdown', 'compose', 'jsonl').
    c.name = "arith"
    # Difficulty knob of synthetic tasks (task-specific meaning, e.g. number of operations).
    c.difficulty = 2
    # JSONL dataset path for name == 'jsonl' (one object per line with prompt and answer).
    c.path = ""
    # Number of synthetic training prompts and held-out eval prompts.
    c.num_train = 4096
    c.num_eval = 256
    return c


def validate(c: ml_collections.ConfigDict, config: ml_collections.ConfigDict) -> None:
    require(bool(c.name), "task.name", "must be set")
    positive(SECTION, c, "num_train")
    positive(SECTION, c, "num_eval", allow_zero=True)
    if c.name == "jsonl":
        require(bool(c.path), "task.path", "is required when task.name='jsonl'")
