"""The Countdown game: reach a target from given numbers with + - * /, each number at most once.

Prompt "Make 13 from 3 5 2". Difficulty d gives d+1 numbers in [1, max_number]; the target is
built by combining all of them (exact division only, no negative intermediate values), so every
problem is solvable. The SFT trace lists the steps then the expression:
"5*2=10\\n10+3=13\\n#### 5*2+3". The verifier parses the expression after '####' with a bounded
parser (never eval), checks the numbers used are a sub-multiset of the given ones and that the
value equals the target exactly. A parsable expression that misses earns only the format reward.
"""

from __future__ import annotations

import random
from collections import Counter

from rlax_tpu.tasks.base import Problem
from rlax_tpu.tasks.expr import ExprError, evaluate
from rlax_tpu.tasks.synthetic import ANSWER_MARK, SyntheticTask

MAX_TARGET = 999
_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}


def _wrap(expr: str, need: bool) -> str:
    return f"({expr})" if need else expr


def _combine(a: tuple[int, str, int], b: tuple[int, str, int], op: str) -> tuple[int, str, int]:
    (va, ea, pa), (vb, eb, pb) = a, b
    p = _PREC[op]
    left = _wrap(ea, pa < p)
    right = _wrap(eb, pb < p or (pb == p and op in "-/"))
    value = {"+": va + vb, "-": va - vb, "*": va * vb, "/": va // vb if vb else 0}[op]
    return value, f"{left}{op}{right}", p


class CountdownTask(SyntheticTask):
    name = "countdown"
    default_max_number = 10

    def generate(self, rng: random.Random, difficulty: int) -> tuple[str, str, dict]:
        while True:
            numbers = [rng.randint(1, self.max_number) for _ in range(difficulty + 1)]
            pool = [(n, str(n), 3) for n in numbers]
            steps = []
            while len(pool) > 1:
                i, j = rng.sample(range(len(pool)), 2)
                a, b = pool[i], pool[j]
                if a[0] < b[0]:
                    a, b = b, a
                ops = ["+", "*"] + (["-"] if a[0] > b[0] else []) + (
                    ["/"] if b[0] > 1 and a[0] % b[0] == 0 else [])
                op = rng.choice(ops)
                c = _combine(a, b, op)
                steps.append(f"{a[0]}{op}{b[0]}={c[0]}")
                pool = [p for k, p in enumerate(pool) if k not in (i, j)] + [c]
            target, expr, _ = pool[0]
            if 1 <= target <= MAX_TARGET:
                break
        shown = sorted(numbers)
        prompt = f"Make {target} from {' '.join(map(str, shown))}"
        return prompt, expr, {"numbers": shown, "target": target, "steps": steps}

    def solution_text(self, problem: Problem) -> str:
        return "\n".join(problem.meta["steps"]) + f"\n{ANSWER_MARK} {problem.answer}"

    def check(self, problem: Problem, answer: str) -> tuple[bool, bool, str]:
        expr = answer.split("=")[0]  # accept "5*2+3=13"
        try:
            value, used = evaluate(expr, self._deadline())
        except ExprError as e:
            return False, False, f"parse_error: {e}"
        available = Counter(int(n) for n in problem.meta["numbers"])
        if Counter(used) - available:
            return True, False, "bad_numbers"
        ok = value == int(problem.meta["target"])
        return True, ok, "correct" if ok else "wrong_value"
