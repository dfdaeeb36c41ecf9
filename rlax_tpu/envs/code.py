"""Code environment: the model writes functions, hidden unit tests run in the sandbox.

The last ```python block of the final turn (else the whole turn) is the solution. One sandboxed
run executes it and then every test under its own timer; the harness reads a random nonce from
stdin before the solution runs and prints the verdicts after it, behind the nonce, so output the
solution prints (or an early exit) cannot pass for verdicts. The harness imports only _signal
and sys: importing json or signal would cost more than the interpreter's start. Reward: correct iff every test
passes; per-test verdicts ('pass', 'fail', 'error', 'timeout', 'not_run') in the details. A
sandbox that could not run masks the sample (info['masked']) instead of scoring it 0.
"""

from __future__ import annotations

import random
import re
import secrets
from collections.abc import Callable

from rlax_tpu.envs.base import Infra, ToolEnv
from rlax_tpu.envs.code_problems import load_code_jsonl, reference_solution, synthetic_problem
from rlax_tpu.envs.generated import Generated
from rlax_tpu.envs.python_tool import make_python_tool
from rlax_tpu.sandbox import SandboxPool
from rlax_tpu.tasks.base import Problem, Reward, combine, is_eval_prompt, prompt_id_for

_BLOCK = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)
PER_TEST_SECONDS = 1.0  # at most; less when the run's wall budget is short

HARNESS = """\
import _signal, sys as _sys
_nonce = _sys.stdin.readline().strip()
_write, _flush = _sys.__stdout__.write, _sys.__stdout__.flush
_solution, _tests = {solution!r}, {tests!r}
class _Slow(BaseException):
    pass
def _alarm(*_):
    raise _Slow()
_ns = {{"__name__": "solution"}}
_verdicts = []
try:
    exec(compile(_solution, "solution.py", "exec"), _ns)
    _loaded = "ok"
except BaseException as _e:
    _loaded = ("error: %s: %s" % (type(_e).__name__, _e))[:200].replace("\\n", " ")
for _t in _tests:
    if _loaded != "ok":
        _verdicts.append("not_run")
        continue
    _signal.signal(_signal.SIGALRM, _alarm)
    _signal.setitimer(_signal.ITIMER_REAL, {per_test})
    try:
        exec(compile(_t, "test.py", "exec"), dict(_ns))
        _v = "pass"
    except _Slow:
        _v = "timeout"
    except AssertionError:
        _v = "fail"
    except BaseException:
        _v = "error"
    finally:
        _signal.setitimer(_signal.ITIMER_REAL, 0)
    _verdicts.append(_v)
_write("\\n%sL %s\\n%sV %s\\n" % (_nonce, _loaded, _nonce, " ".join(_verdicts)))
_flush()
"""


def extract_code(turn: str) -> tuple[str, bool]:
    """(the solution, whether it came in a ```python block)."""
    blocks = _BLOCK.findall(turn)
    return (blocks[-1], True) if blocks else (turn, False)


class CodeEnv(Generated, ToolEnv):
    """Synthetic problems (difficulty = functions to write), or env.code_path's JSONL."""

    name = "code"
    preamble = "You are an expert Python programmer. You may test code with the python tool."

    def __init__(self, config, count_tokens: Callable[[str], int], pool: SandboxPool):
        self.pool = pool
        super().__init__(config, count_tokens)
        self._ranges(config.task)
        self.weights = (float(config.task.correct_weight), float(config.task.format_weight))
        self.user = load_code_jsonl(config.env.code_path) if config.env.code_path else None

    def tool_functions(self):
        return [make_python_tool(self.pool)]

    def generate(self, rng: random.Random, difficulty: int) -> tuple[str, str, dict]:
        prompt, tests, meta = synthetic_problem(rng, difficulty)
        return prompt, "", {**meta, "tests": tests}

    def problem_at(self, split: str, seed: int, index: int) -> Problem:
        if self.user is None:
            return super().problem_at(split, seed, index)
        rows = [r for r in self.user if is_eval_prompt(r[0], self.eval_fraction) == (split == "eval")]
        if not rows:
            rows = self.user  # a file too small to split: every problem in both
        prompt, tests = rows[random.Random(f"{self.name}:{split}:{seed}:{index}").randrange(len(rows))]
        return Problem(prompt_id_for(self.name, prompt), prompt, "", {"env": self.name, "tests": tests})

    def reference_turns(self, problem: Problem) -> list[str] | None:
        if "functions" not in problem.meta:
            return None  # a user problem: no reference solution
        return [f"```python\n{reference_solution(problem.meta['functions'])}```"]

    def score_answer(self, problem: Problem, answer: str) -> Reward:
        code, fenced = extract_code(answer)
        return self.run_tests(code, list(problem.meta["tests"]), fenced)

    def run_tests(self, code: str, tests: list[str], fenced: bool = True) -> Reward:
        """Runs the tests against code in the sandbox; raises Infra when the sandbox failed."""
        nonce = secrets.token_hex(16)
        # the run keeps sandbox.wall_seconds; each test gets its share, so that one slow test
        # leaves time for the others' verdicts
        per_test = min(PER_TEST_SECONDS, self.pool.limits.wall_seconds / (len(tests) + 1))
        src = HARNESS.format(solution=code, tests=tests, per_test=per_test)
        res = self.pool.submit(src, stdin=nonce + "\n").result()
        if res.infra:
            raise Infra(res.detail or "sandbox unavailable")
        loaded, verdicts = None, None
        for line in res.stdout.splitlines():
            if line.startswith(nonce + "L "):
                loaded = line[len(nonce) + 2:]
            elif line.startswith(nonce + "V "):
                verdicts = line[len(nonce) + 2:].split()
        complete = loaded is not None and verdicts is not None and len(verdicts) == len(tests)
        if not complete:  # killed, or exited before the harness could answer
            verdicts = [res.reason or "not_run"] * len(tests)
            loaded = f"no verdicts (sandbox: {res.reason or 'exited early'})"
        passed = sum(v == "pass" for v in verdicts)
        correct = passed == len(tests) and complete
        reason = "" if correct else ("solution_error" if loaded != "ok" else "tests_failed")
        return Reward(combine(correct, fenced, *self.weights),
                      {"correct": correct, "reason": reason, "verdicts": verdicts, "passed": passed,
                       "total": len(tests), "loaded": loaded, "sandbox_reason": res.reason})
