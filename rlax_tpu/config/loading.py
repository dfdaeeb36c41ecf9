"""Loading a config file ``path.py[:arg]`` outside absl (tests, launch, tools)."""

from __future__ import annotations

import importlib.util
import os

import ml_collections

from rlax_tpu.config.errors import ConfigError
from rlax_tpu.config.validate import validate


def load_config(spec: str, overrides: dict | None = None) -> ml_collections.ConfigDict:
    """Loads ``configs/x.py:variant``, applies dotted ``overrides``, validates and locks it.

    This is the non-flag twin of ``config_flags.DEFINE_config_file``: same files, same rules.
    """
    path, _, arg = spec.partition(":")
    if not os.path.exists(path):
        raise ConfigError("<file>", f"config file {path!r} does not exist")
    module_spec = importlib.util.spec_from_file_location("_rlax_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError("<file>", f"{path!r} defines no get_config(arg)")
    config = module.get_config(arg) if arg else module.get_config()
    for dotted, value in (overrides or {}).items():
        _set_dotted(config, dotted, value)
    return finalize(config)


def from_flags(config_value, workdir: str | None) -> ml_collections.ConfigDict:
    """The mains' start-up: --config and --workdir given, the config validated and locked. A bad
    field becomes one clear usage line (absl prints it) instead of a traceback."""
    from absl import app

    if config_value is None or not workdir:
        raise app.UsageError("--config and --workdir are required")
    try:
        return finalize(config_value)
    except ConfigError as e:
        raise app.UsageError(str(e)) from None


def finalize(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Validates and locks a config; every main calls this once at start-up."""
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
