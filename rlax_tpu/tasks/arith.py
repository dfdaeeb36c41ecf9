"""Multi-step integer arithmetic with worked steps.

Prompt "Compute: 3+4*2-5". Difficulty = number of operations (drawn from task.operators, default
+, -, *) over integers in [1, max_number]. The SFT trace rewrites the expression one operation at
a time, products first then left to right, and ends with the answer line:
"3+4*2-5=3+8-5=11-5=6\\n#### 6".
"""

from __future__ import annotations

import random
import re

from rlax_tpu.tasks.base import Problem
from rlax_tpu.tasks.synthetic import ANSWER_MARK, SyntheticTask

_INT = re.compile(r"[+-]?\d{1,30}")


def _render(nums: list[int], ops: list[str]) -> str:
    out = str(nums[0])
    for op, n in zip(ops, nums[1:], strict=True):
        out += op + str(n)
    return out


def worked_steps(nums: list[int], ops: list[str]) -> list[str]:
    """Expressions after each single reduction (first the leftmost '*', then left to right)."""
    nums, ops = list(nums), list(ops)
    steps = [_render(nums, ops)]
    while ops:
        i = ops.index("*") if "*" in ops else 0
        a, b, op = nums[i], nums[i + 1], ops[i]
        value = a * b if op == "*" else a + b if op == "+" else a - b
        nums[i:i + 2] = [value]
        del ops[i]
        steps.append(_render(nums, ops))
    return steps


class ArithTask(SyntheticTask):
    name = "arith"
    default_max_number = 9

    def __init__(self, config):
        super().__init__(config)
        self.operators = str(config.get("operators", "+-*"))  # validated in config.task

    def generate(self, rng: random.Random, difficulty: int) -> tuple[str, str, dict]:
        nums = [rng.randint(1, self.max_number) for _ in range(difficulty + 1)]
        ops = [rng.choice(self.operators) for _ in range(difficulty)]
        expr = _render(nums, ops)
        answer = worked_steps(nums, ops)[-1]
        return f"Compute: {expr}", answer, {"nums": nums, "ops": "".join(ops)}

    def solution_text(self, problem: Problem) -> str:
        steps = worked_steps(list(problem.meta["nums"]), list(problem.meta["ops"]))
        return "=".join(steps) + f"\n{ANSWER_MARK} {problem.answer}"

    def check(self, problem: Problem, answer: str) -> tuple[bool, bool, str]:
        text = answer.strip().replace(",", "")
        if not _INT.fullmatch(text):
            return False, False, "bad_format"
        ok = int(text) == int(problem.answer)
        return True, ok, "correct" if ok else "wrong_answer"
