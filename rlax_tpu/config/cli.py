"""The start-up every main shares (trainer, inference worker, evaluator, param server, launcher):

    _CONFIG, _WORKDIR = cli.define_flags("Run directory ...")
    def main(argv):
        config = cli.start(_CONFIG, _WORKDIR, run_config="write")   # the trainer; others "check"

``--config=configs/X.py[:arg]`` with ``--config.a.b=v`` overrides and ``--workdir`` are required;
the config is validated (a bad field is one usage line naming it, not a traceback), locked, and
compared with the run's ``<workdir>/config.json`` (rlax_tpu.config.run_config), which the trainer
writes.
"""

from __future__ import annotations

import ml_collections

from rlax_tpu.config import run_config as run_config_lib
from rlax_tpu.config.errors import ConfigError
from rlax_tpu.config.loading import finalize

CONFIG_HELP = "Experiment config file, configs/X.py[:variant]; override a field with --config.a.b=value."
# What a main does with <workdir>/config.json: the trainer records its config ('write', after the
# check), roles that must agree with the trainer compare theirs ('check'), and a process that reads
# only the store section (the param-server status, with its own small config) leaves it ('ignore').
RUN_CONFIG_MODES = ("write", "check", "ignore")


def define_flags(workdir_help: str):
    """Defines --config and --workdir on absl's global flags; returns their holders."""
    from absl import flags
    from ml_collections import config_flags

    return (config_flags.DEFINE_config_file("config", None, CONFIG_HELP, lock_config=False),
            flags.DEFINE_string("workdir", None, workdir_help))


def start(config_flag, workdir_flag, *, run_config: str) -> ml_collections.ConfigDict:
    """The validated, locked config of this process, checked against (and with 'write' recorded
    as) the run's config; absl UsageError for a missing flag or a bad field."""
    from absl import app

    if run_config not in RUN_CONFIG_MODES:
        raise ValueError(f"run_config must be one of {RUN_CONFIG_MODES}, got {run_config!r}")
    if config_flag.value is None or not workdir_flag.value:
        raise app.UsageError("--config and --workdir are required")
    try:
        config = finalize(config_flag.value)
        if run_config != "ignore":
            run_config_lib.check(config, workdir_flag.value, write=run_config == "write")
    except ConfigError as e:
        raise app.UsageError(str(e)) from None
    return config
