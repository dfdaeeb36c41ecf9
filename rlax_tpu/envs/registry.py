"""envs.make_env(config, count_tokens) -> Environment, by config.env.name."""

from __future__ import annotations

from collections.abc import Callable

from rlax_tpu.config.errors import ConfigError
from rlax_tpu.envs.base import Environment, TaskEnv
from rlax_tpu.envs.code import CodeEnv
from rlax_tpu.envs.kb_qa import KbQaEnv
from rlax_tpu.envs.tool_arith import ToolArithEnv
from rlax_tpu.sandbox import SandboxPool

ENVS: dict[str, type[Environment]] = {"tool_arith": ToolArithEnv, "code": CodeEnv, "kb_qa": KbQaEnv}
NEEDS_SANDBOX = ("tool_arith", "code")


def make_env(config, count_tokens: Callable[[str], int], pool: SandboxPool | None = None, *,
             problems_only: bool = False) -> Environment:
    """A fresh environment (one episode at a time) for the whole config. count_tokens measures
    environment text for env.max_total_tokens (the tokenizer's length). pool: the sandbox pool
    tools and verifiers run in (shared by the environments of a process; built from
    config.sandbox when None and the environment needs one; none with ``problems_only``: an
    environment that only gives problems and first messages, as the trainer's controller needs,
    never runs a tool). env.name '' wraps task.name."""
    name = config.env.name
    if name == "":
        from rlax_tpu.tasks import get_task

        return TaskEnv(config, get_task(config.task), count_tokens)
    if name not in ENVS:
        raise ConfigError("env.name", f"unknown environment {name!r}; known: {sorted(ENVS)}")
    if name in NEEDS_SANDBOX:
        if problems_only:
            return ENVS[name](config, count_tokens, None)
        return ENVS[name](config, count_tokens, pool or SandboxPool.from_config(config.sandbox))
    return ENVS[name](config, count_tokens)


class EnvProblems:
    """An environment's problems in the shape the prompt pipeline reads a task's
    (tasks.prompt_dataset: name, config = config.task, train/eval problems, problem_at)."""

    def __init__(self, env: Environment):
        self.env, self.name, self.config = env, env.name, env.config.task
        self.digest = f"env:{env.name}"
        if hasattr(env, "problem_at"):
            self.problem_at = env.problem_at

    def train_problems(self, n: int, seed: int):
        return self.env.train_problems(n, seed)

    def eval_problems(self, n: int, seed: int):
        return self.env.eval_problems(n, seed)
