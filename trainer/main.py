"""Trainer: python -m trainer.main --config=configs/X.py[:arg] --workdir=DIR [--multihost].

Resumes from the newest complete checkpoint in --workdir; on a fresh workdir it trains the
tokenizer (if configured), warm-starts with SFT, then runs RL. Exit 0 on completion or after a
SIGTERM/SIGINT with a checkpoint of the current step.
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from rlax_tpu import logs

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/X.py[:arg]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, default store).")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() (TPU pods).")


def main(argv) -> None:
    del argv
    if _CONFIG.value is None or not _WORKDIR.value:
        raise app.UsageError("--config and --workdir are required")
    logs.setup()
    from rlax_tpu.config import ConfigError, finalize

    try:
        config = finalize(_CONFIG.value)
    except ConfigError as e:  # a bad field: one clear line, no traceback
        raise app.UsageError(str(e)) from None
    if _MULTIHOST.value or config.trainer.multihost:
        import jax

        jax.distributed.initialize()
    from trainer.run import run

    run(config, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
