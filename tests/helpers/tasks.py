"""A task built from the default config with a few task fields changed."""

from __future__ import annotations

from rlax_tpu import tasks
from rlax_tpu.config import get_base_config


def make_task(name: str, **overrides):
    c = get_base_config()
    c.task.name = name
    for k, v in overrides.items():
        c.task[k] = v
    return tasks.get_task(c.task)
