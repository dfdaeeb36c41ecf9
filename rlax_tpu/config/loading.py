"""The one way a config is loaded: ``path.py[:arg]`` plus overrides, validated and locked.

Overrides are either ``--config.a.b=v`` flag strings, parsed by ml_collections' config flags as
the mains parse their command line (so a launcher and the roles it starts read the same values),
or a dict of dotted field -> value (tests, tools).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import ml_collections

from rlax_tpu.config.errors import ConfigError
from rlax_tpu.config.validate import validate


def load_config(spec: str, overrides: Mapping[str, object] | Sequence[str] | None = None
                ) -> ml_collections.ConfigDict:
    """Loads ``configs/x.py:variant``, applies ``overrides``, validates and locks it."""
    from absl import flags
    from ml_collections import config_flags

    path = spec.partition(":")[0]
    if not os.path.exists(path):
        raise ConfigError("<file>", f"config file {path!r} does not exist")
    as_flags = [] if overrides is None or isinstance(overrides, Mapping) else list(overrides)
    argv = ["load_config", f"--config={spec}", *as_flags]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", default=None, flag_values=fv, lock_config=False, sys_argv=argv)
    try:
        fv(argv)
    except flags.Error as e:
        raise ConfigError("<file>", f"{spec} {' '.join(as_flags)}: {e}") from None
    config = fv.config
    for dotted, value in (overrides.items() if isinstance(overrides, Mapping) else ()):
        _set_dotted(config, dotted, value)
    return finalize(config)


def finalize(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Validates and locks a config (``load_config`` and every main end with this)."""
    validate(config)
    config.lock()
    return config


def _set_dotted(config: ml_collections.ConfigDict, dotted: str, value) -> None:
    node = config
    parts = dotted.split(".")
    for part in parts[:-1]:
        if part not in node:
            raise ConfigError(dotted, f"no such section {part!r}")
        node = node[part]
    if parts[-1] not in node:
        raise ConfigError(dotted, "no such field")
    node[parts[-1]] = value
