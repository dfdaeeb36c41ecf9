"""Experiment configuration: ml-collections ConfigDicts with validation that names the field.

Each top-level section (model, tokenizer, task, mesh, sft, rl, trainer, inference, store, eval,
launch) is defined, with every field documented, in ``rlax_tpu/config/sections/<name>.py``.
``base.get_base_config()`` assembles them; experiment files in configs/ start from it and
override. ``validate(config)`` runs each section's checks and raises ``ConfigError`` naming the
offending field. ``load_config`` is the one loader (file, variant, overrides); every main starts
through ``cli.start`` and checks the run's ``config.json`` (``run_config``).
"""

from rlax_tpu.config import presets  # noqa: F401
from rlax_tpu.config.base import get_base_config
from rlax_tpu.config.errors import ConfigError
from rlax_tpu.config.loading import finalize, load_config
from rlax_tpu.config.validate import validate

__all__ = ["ConfigError", "finalize", "get_base_config", "load_config", "validate"]
