"""tasks.get_task(config.task) -> Task, by config.task.name."""

from __future__ import annotations

from rlax_tpu.config.errors import ConfigError
from rlax_tpu.tasks.arith import ArithTask
from rlax_tpu.tasks.base import Task
from rlax_tpu.tasks.compose import ComposeTask
from rlax_tpu.tasks.countdown import CountdownTask
from rlax_tpu.tasks.jsonl import Gsm8kTask, JsonlTask

TASKS: dict[str, type[Task]] = {
    "arith": ArithTask,
    "countdown": CountdownTask,
    "compose": ComposeTask,
    "jsonl": JsonlTask,
    "gsm8k": Gsm8kTask,
}


def get_task(task_config) -> Task:
    """Builds the task named by config.task.name (a ConfigDict section, not the whole config)."""
    if "task" in task_config and "name" not in task_config:
        task_config = task_config.task  # tolerate the whole config
    name = task_config.name
    if name not in TASKS:
        raise ConfigError("task.name", f"unknown task {name!r}; known: {sorted(TASKS)}")
    return TASKS[name](task_config)
