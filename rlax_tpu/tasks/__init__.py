"""Verifiable tasks and rewards: synthetic reasoning tasks, math datasets, the math-verify checker.

    task = tasks.get_task(config.task)
    problems = task.train_problems(n, seed)          # list[Problem]
    reward = task.reward(problem, completion_text)   # Reward(score, details); never raises
    rewards = task.rewards(problems, completions)    # a batch (a group) at once
    ds = tasks.prompt_dataset(task, "train", seed)   # grain.MapDataset of problem dicts

Names are imported on first use: the reward pool's child processes import
rlax_tpu.tasks.math_answer, which must not pull in grain (and with it jax) through this file.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ArithTask": "arith", "ComposeTask": "compose", "CountdownTask": "countdown",
    "Deadline": "base", "Problem": "base", "Reward": "base", "RewardTimeout": "base", "Task": "base",
    "safe_reward": "base", "is_solved": "base",
    "PromptSource": "data", "prompt_dataset": "data",
    "DatasetError": "jsonl_data", "load_jsonl": "jsonl_data",
    "Gsm8kTask": "jsonl", "JsonlTask": "jsonl",
    "check_answers": "math_answer", "extract_answer": "answers", "is_equivalent": "math_answer",
    "verify": "math_answer",
    "mean_pass_at_k": "metrics", "pass_at_k": "metrics",
    "TASKS": "registry", "get_task": "registry",
    "RewardPool": "reward_pool",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
