"""config.sft: supervised warm start on prompt -> answer traces (prompt tokens masked), or on an
environment's solved episodes (environment tokens masked)."""

import ml_collections

from rlax_tpu.config.sections._checks import one_of, positive, require

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
    # Compute dtype of the SFT warm start ('' = model.dtype): 'float32' keeps a small model's
    # warm start exact when RL computes in bfloat16 (docs/trainer.md, "Mixed precision").
    c.dtype = ""
    # A JSONL of env.name's solved episodes (reference model turns with the tools' actual
    # replies), written by `python -m rlax_tpu.envs.traces`: SFT then trains on the episode
    # token layout RL samples in, loss on model tokens only. '' = the task's prompt -> solution
    # traces. It needs sft.steps x sft.batch_size traces.
    c.traces_path = ""
    return c


def validate(c: ml_collections.ConfigDict, config: ml_collections.ConfigDict) -> None:
    positive(SECTION, c, "steps", allow_zero=True)
    positive(SECTION, c, "batch_size")
    positive(SECTION, c, "learning_rate")
    positive(SECTION, c, "warmup_steps", allow_zero=True)
    positive(SECTION, c, "max_len")
    one_of(SECTION, c, "dtype", ("", "float32", "bfloat16", "auto"))
    require(not c.traces_path or bool(config.env.name), "sft.traces_path",
            "holds an environment's episodes: set env.name too")
