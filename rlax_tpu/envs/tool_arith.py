"""Tool-integrated arithmetic: sums and products of 3-4 digit numbers, too large to do in the
head, with a Python tool; the final answer ('#### N', or the last number) is checked exactly."""

from __future__ import annotations

import random
from collections.abc import Callable

from rlax_tpu.envs.base import ToolEnv
from rlax_tpu.envs.generated import Generated
from rlax_tpu.envs.python_tool import make_python_tool
from rlax_tpu.envs.tool_calls import ToolCall, format_call
from rlax_tpu.sandbox import SandboxPool
from rlax_tpu.tasks.answers import extract_answer
from rlax_tpu.tasks.base import Problem, Reward, combine


class ToolArithEnv(Generated, ToolEnv):
    """difficulty = operations (task.min_difficulty..difficulty); operators from task.operators."""

    name = "tool_arith"
    preamble = "You are a careful assistant that uses tools for exact arithmetic."

    def __init__(self, config, count_tokens: Callable[[str], int], pool: SandboxPool):
        self.pool = pool
        super().__init__(config, count_tokens)
        self._ranges(config.task)
        self.operators = str(config.task.operators)
        self.weights = (float(config.task.correct_weight), float(config.task.format_weight))

    def tool_functions(self):
        return [make_python_tool(self.pool)]

    def generate(self, rng: random.Random, difficulty: int) -> tuple[str, str, dict]:
        nums = [rng.randint(100, 9999) for _ in range(difficulty + 1)]
        ops = [rng.choice(self.operators) for _ in range(difficulty)]
        expr = str(nums[0]) + "".join(f" {o} {n}" for o, n in zip(ops, nums[1:], strict=True))
        value = eval(expr, {"__builtins__": {}})  # noqa: S307 - digits and + - * we generated
        prompt = f"What is {expr}? Give the final answer as '#### <number>'."
        return prompt, str(value), {"expression": expr}

    def reference_turns(self, problem: Problem) -> list[str]:
        expr = problem.meta["expression"]
        call = format_call(ToolCall("python", {"code": f"print({expr})"}))
        return [f"I will compute it with Python.\n{call}", f"{expr} = {problem.answer}\n#### {problem.answer}"]

    def score_answer(self, problem: Problem, answer: str) -> Reward:
        got, _ = extract_answer(answer, "any")
        if got is None:  # the last number written, for a turn that just states it
            got, _ = extract_answer(answer, "last_number")
        if got is None:
            return Reward(combine(False, False, *self.weights), {"correct": False, "reason": "no_answer"})
        got = got.replace(",", "").strip().rstrip(".")
        correct = got == problem.answer
        return Reward(combine(correct, True, *self.weights),
                      {"correct": correct, "reason": "" if correct else "wrong", "answer": got})
