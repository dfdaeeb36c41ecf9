"""Composition of list primitives, for measuring extrapolation to deeper compositions.

Prompt "Apply sort, add1, reverse to 3 1 2". Difficulty = number of composed operations over a
list of 3-6 digits. Primitives: reverse, sort, add1/add2/add3 (each digit + k mod 10), take3
(first 3 items), drop1 (remove the first item), rot1 (first item to the end). The SFT trace
shows each intermediate list: "sort: 1 2 3\\nadd1: 2 3 4\\nreverse: 4 3 2\\n#### 4 3 2".
Train on difficulty <= d and evaluate on d+1.. with task.eval_min_difficulty.
"""

from __future__ import annotations

import random
import re

from rlax_tpu.tasks.base import Problem
from rlax_tpu.tasks.synthetic import ANSWER_MARK, SyntheticTask

_DIGITS = re.compile(r"\d( \d)*")


def _add(k: int):
    return lambda xs: [(x + k) % 10 for x in xs]


PRIMITIVES = {
    "reverse": lambda xs: xs[::-1],
    "sort": sorted,
    "add1": _add(1),
    "add2": _add(2),
    "add3": _add(3),
    "take3": lambda xs: xs[:3],
    "drop1": lambda xs: xs[1:],
    "rot1": lambda xs: xs[1:] + xs[:1],
}
_SHRINKING = ("take3", "drop1")


def apply_ops(xs: list[int], ops: list[str]) -> list[list[int]]:
    """The list after each op."""
    out = []
    for op in ops:
        xs = list(PRIMITIVES[op](xs))
        out.append(xs)
    return out


def _fmt(xs: list[int]) -> str:
    return " ".join(map(str, xs))


class ComposeTask(SyntheticTask):
    name = "compose"

    def generate(self, rng: random.Random, difficulty: int) -> tuple[str, str, dict]:
        xs = [rng.randint(0, 9) for _ in range(rng.randint(3, 6))]
        ops, cur = [], list(xs)
        names = sorted(PRIMITIVES)
        for _ in range(difficulty):
            choices = [n for n in names if n not in _SHRINKING or len(cur) > 3]
            op = rng.choice(choices)
            ops.append(op)
            cur = list(PRIMITIVES[op](cur))
        prompt = f"Apply {', '.join(ops)} to {_fmt(xs)}"
        return prompt, _fmt(cur), {"input": xs, "ops": ops}

    def solution_text(self, problem: Problem) -> str:
        ops = list(problem.meta["ops"])
        states = apply_ops(list(problem.meta["input"]), ops)
        lines = [f"{op}: {_fmt(s)}" for op, s in zip(ops, states, strict=True)]
        return "\n".join(lines) + f"\n{ANSWER_MARK} {problem.answer}"

    def check(self, problem: Problem, answer: str) -> tuple[bool, bool, str]:
        text = " ".join(answer.replace(",", " ").strip("[]() ").split())
        if not _DIGITS.fullmatch(text):
            return False, False, "bad_format"
        ok = text == problem.answer
        return True, ok, "correct" if ok else "wrong_answer"
