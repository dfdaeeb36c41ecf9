"""The code environment's reward on correct, wrong, crashing and malicious solutions."""

from __future__ import annotations

import concurrent.futures
import json

import pytest

from rlax_tpu import envs
from rlax_tpu.config import ConfigError, get_base_config
from rlax_tpu.sandbox import SandboxPool
from tests.rlax_tpu.sandbox.usable import needs_bwrap

pytestmark = needs_bwrap

CORRECT = {
    "reverse_words": "def reverse_words(s):\n    return ' '.join(s.split()[::-1])",
    "count_vowels": "def count_vowels(s):\n    return sum(c in 'aeiou' for c in s)",
    "capitalize_words": "def capitalize_words(s):\n    return ' '.join(w[:1].upper() + w[1:] for w in s.split(' '))",
    "is_palindrome": "def is_palindrome(s):\n    return s == s[::-1]",
    "sum_even": "def sum_even(xs):\n    return sum(x for x in xs if x % 2 == 0)",
    "second_largest": "def second_largest(xs):\n    d = sorted(set(xs))\n    return d[-2] if len(d) > 1 else None",
    "running_sum": "import itertools\ndef running_sum(xs):\n    return list(itertools.accumulate(xs))",
    "dedupe": "def dedupe(xs):\n    return list(dict.fromkeys(xs))",
    "digit_sum": "def digit_sum(n):\n    return sum(int(c) for c in str(abs(n)))",
    "gcd": "import math\ndef gcd(a, b):\n    return math.gcd(a, b)",
    "fib": "def fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a",
    "is_prime": "def is_prime(n):\n    return n > 1 and all(n % d for d in range(2, int(n ** 0.5) + 1))",
}


def fenced(code: str) -> str:
    return f"Here is my solution.\n```python\n{code}\n```"


def stubs(names, body: str) -> str:
    return "\n".join(f"def {n}(*args):\n    {body}" for n in names)


@pytest.fixture(scope="module")
def env():
    c = get_base_config()
    c.env.name = "code"
    c.task.min_difficulty, c.task.difficulty = 1, 2
    c.sandbox.cpu_seconds, c.sandbox.wall_seconds = 2, 4.0
    with SandboxPool.from_config(c.sandbox) as pool:
        yield envs.make_env(c, lambda s: len(s.split()), pool=pool)


def score(env, problem, turn: str):
    env.reset(problem)
    _, reward, done, info = env.step(turn)
    assert done
    return reward, info


def test_correct_solutions_pass_every_hidden_test(env):
    for p in env.train_problems(6, seed=0):
        names = p.meta["functions"]
        reward, info = score(env, p, fenced("\n\n".join(CORRECT[n] for n in names)))
        d = info["details"]
        assert reward == 1.0 and info["correct"] and not info["masked"], d
        assert d["verdicts"] == ["pass"] * d["total"] and d["total"] == 5 * len(names)


def test_reference_solutions_pass(env):
    for p in env.train_problems(8, seed=4):
        env.reset(p)
        _, reward, done, info = env.step(env.reference_turns(p)[0])
        assert done and reward == 1.0, info["details"]


def test_wrong_crashing_and_malicious_solutions_score_zero(env):
    p = next(q for q in env.train_problems(20, seed=1) if len(q.meta["functions"]) == 1)
    names = p.meta["functions"]
    good = "\n\n".join(CORRECT[n] for n in names)
    total = 5 * len(names)
    cases = {
        "wrong": (stubs(names, "return ('nope',)"), {"fail"}),
        "raises": (stubs(names, "raise ValueError('no')"), {"error"}),
        "syntax error": ("def broken(:\n", {"not_run"}),
        "crash at import": (good + "\nraise SystemExit(1)", {"not_run"}),
        "exit 0 before the tests": (good + "\nimport os\nos._exit(0)", {"not_run"}),
        "prints fake verdicts": (good + "\nimport sys\nprint(json_line)\nsys.stdout.flush()\nimport os\nos._exit(0)",
                                 {"not_run"}),
        "always-equal result": (
            "class Eq:\n    def __eq__(self, other):\n        return True\n" + stubs(names, "return Eq()"), {"fail"}),
        "replaces sys.stdout": (stubs(names, "return ('nope',)") + "\nimport sys\nclass Out:\n"
                                "    def write(self, s):\n        sys.__stdout__.write(s.replace('fail', 'pass'))\n"
                                "    def flush(self):\n        pass\nsys.stdout = sys.__stdout__ = Out()", {"fail"}),
        "prints nonce-less verdict lines": (stubs(names, "return ('nope',)") + "\nprint('V ' + 'pass ' * 50)",
                                            {"fail"}),
        "loops in a test, ignores SIGALRM": (
            "import signal\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\n" + stubs(names, "while True: pass"),
            {"timeout"}),
        "loops at import": (good + "\nwhile True:\n    pass", {"timeout"}),
        "fork bomb": (good + "\nimport os\nwhile True:\n    os.fork()", {"not_run"}),
        "reads the host": (good + "\nprint(open('/etc/shadow').read())", {"not_run"}),
    }
    fake = "\n".join(["L ok", "V " + " ".join(["pass"] * total)])

    def run(code):  # an environment per episode, sharing the pool: the slow cases run at once
        episode = envs.make_env(env.config, lambda s: len(s.split()), pool=env.pool)
        return score(episode, p, fenced(code.replace("json_line", repr(fake))))

    with concurrent.futures.ThreadPoolExecutor(4) as ex:
        results = dict(zip(cases, ex.map(run, [code for code, _ in cases.values()]), strict=True))
    for name, (_, verdicts) in cases.items():
        reward, info = results[name]
        d = info["details"]
        assert reward == 0.0 and not info["correct"] and not info["masked"], (name, d)
        assert set(d["verdicts"]) == verdicts and d["passed"] == 0, (name, d)


def test_partly_right_gets_per_test_verdicts(env):
    p = next(q for q in env.train_problems(20, seed=2) if len(q.meta["functions"]) == 2)
    first, second = p.meta["functions"]
    reward, info = score(env, p, fenced(CORRECT[first] + "\n" + stubs([second], "return None")))
    d = info["details"]
    assert reward == 0.0 and d["verdicts"][:5] == ["pass"] * 5 and d["passed"] >= 5 and "fail" in d["verdicts"]


def test_a_dead_sandbox_masks_the_sample():
    c = get_base_config()
    c.env.name = "code"
    dead = SandboxPool.from_config(c.sandbox)
    dead.shutdown()
    env = envs.make_env(c, lambda s: len(s.split()), pool=dead)
    p = env.train_problems(1, seed=0)[0]
    reward, info = score(env, p, fenced("\n".join(CORRECT[n] for n in p.meta["functions"])))
    assert info["masked"] and reward == 0.0 and info["details"]["reason"].startswith("infra")


def test_user_jsonl_problems(tmp_path, env):
    path = tmp_path / "code.jsonl"
    rows = [{"prompt": f"Write add{i}(a, b) returning a + b + {i}.",
             "tests": [f"assert add{i}(1, 2) == {3 + i}", f"assert add{i}(-1, 1) == {i}"]} for i in range(8)]
    rows.append({"prompt": "Write one().", "tests": "assert one() == 1"})
    path.write_text("\n".join(json.dumps(r) for r in rows))
    c = get_base_config()
    c.env.name, c.env.code_path = "code", str(path)
    user_env = envs.make_env(c, lambda s: len(s.split()), pool=env.pool)
    p = user_env.train_problems(1, seed=0)[0]
    name = p.prompt.split()[1].split("(")[0]
    code = "def one():\n    return 1" if name == "one" else f"def {name}(a, b):\n    return a + b + {name[3:]}"
    reward, info = score(user_env, p, fenced(code))
    assert reward == 1.0, info
    path.write_text('{"prompt": "x"}\n')
    with pytest.raises(ConfigError, match="env.code_path"):
        envs.make_env(c, len, pool=env.pool)
