"""Verifiable tasks and rewards: synthetic reasoning tasks, JSONL datasets, the math verifier.

    task = tasks.get_task(config.task)
    problems = task.train_problems(n, seed)        # list[Problem]
    reward = task.reward(problem, completion_text) # Reward(score, details); never raises
    ds = tasks.prompt_dataset(task, "train", seed) # grain.MapDataset of problem dicts
"""

from rlax_tpu.tasks.arith import ArithTask
from rlax_tpu.tasks.base import (
    Deadline,
    Problem,
    Reward,
    RewardTimeout,
    Task,
    is_solved,
    safe_reward,
)
from rlax_tpu.tasks.compose import ComposeTask
from rlax_tpu.tasks.countdown import CountdownTask
from rlax_tpu.tasks.data import PromptSource, prompt_dataset
from rlax_tpu.tasks.jsonl import DatasetError, JsonlTask, load_jsonl
from rlax_tpu.tasks.math_verify import extract_answer, is_equivalent, verify
from rlax_tpu.tasks.metrics import mean_pass_at_k, pass_at_k
from rlax_tpu.tasks.registry import TASKS, get_task

__all__ = [
    "ArithTask", "ComposeTask", "CountdownTask", "DatasetError", "Deadline", "JsonlTask", "Problem",
    "PromptSource", "Reward", "RewardTimeout", "TASKS", "Task", "extract_answer", "get_task",
    "is_equivalent", "is_solved", "load_jsonl", "mean_pass_at_k", "pass_at_k", "prompt_dataset", "safe_reward",
    "verify",
]
