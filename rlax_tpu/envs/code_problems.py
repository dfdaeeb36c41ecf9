"""Synthetic function-writing problems (strings, lists, arithmetic) with hidden unit tests, and
user problems from JSONL ({prompt, tests}). Expected values come from reference functions run
here, in-process, on generated inputs; the tests are plain `assert f(...) == ...` lines."""

from __future__ import annotations

import json
import random
import string
from collections.abc import Callable

from rlax_tpu.config.errors import ConfigError

VISIBLE_TESTS = 2   # shown in the prompt as examples
HIDDEN_TESTS = 5


def _words(rng: random.Random) -> str:
    return " ".join("".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(1, 6)))
                    for _ in range(rng.randint(1, 5)))


def _ints(rng: random.Random) -> list[int]:
    return [rng.randint(-20, 40) for _ in range(rng.randint(0, 7))]


# name, signature, description, reference solution (source), argument generator. The expected
# values come from running the reference here; the same source is the reference answer (SFT).
FAMILIES: list[tuple[str, str, str, str, Callable[[random.Random], tuple]]] = [
    ("reverse_words", "reverse_words(s: str) -> str",
     "returns the words of s (split on spaces) in reverse order, joined by single spaces",
     "def reverse_words(s):\n    return ' '.join(reversed(s.split()))", lambda r: (_words(r),)),
    ("count_vowels", "count_vowels(s: str) -> int", "returns how many of the letters of s are in 'aeiou'",
     "def count_vowels(s):\n    return sum(c in 'aeiou' for c in s)", lambda r: (_words(r),)),
    ("capitalize_words", "capitalize_words(s: str) -> str",
     "returns s with the first letter of every space-separated word upper-cased",
     "def capitalize_words(s):\n    return ' '.join(w[:1].upper() + w[1:] for w in s.split(' '))",
     lambda r: (_words(r),)),
    ("is_palindrome", "is_palindrome(s: str) -> bool", "returns whether s reads the same backwards",
     "def is_palindrome(s):\n    return s == s[::-1]",
     lambda r: (r.choice(["abcba", "abba", "ab", "a", "", "xyzzyx", "level", "lever"]),)),
    ("sum_even", "sum_even(xs: list[int]) -> int", "returns the sum of the even numbers in xs",
     "def sum_even(xs):\n    return sum(x for x in xs if x % 2 == 0)", lambda r: (_ints(r),)),
    ("second_largest", "second_largest(xs: list[int]) -> int | None",
     "returns the second largest distinct value in xs, or None if there are fewer than two",
     "def second_largest(xs):\n    distinct = sorted(set(xs))\n    return distinct[-2] if len(distinct) >= 2 else None",
     lambda r: (_ints(r),)),
    ("running_sum", "running_sum(xs: list[int]) -> list[int]",
     "returns the list of prefix sums of xs (element i is xs[0] + ... + xs[i])",
     "def running_sum(xs):\n    out, total = [], 0\n    for x in xs:\n        total += x\n        out.append(total)\n"
     "    return out", lambda r: (_ints(r),)),
    ("dedupe", "dedupe(xs: list[int]) -> list[int]",
     "returns xs without repeated values, keeping the first occurrence of each, in order",
     "def dedupe(xs):\n    return list(dict.fromkeys(xs))", lambda r: (_ints(r),)),
    ("digit_sum", "digit_sum(n: int) -> int", "returns the sum of the decimal digits of abs(n)",
     "def digit_sum(n):\n    return sum(int(c) for c in str(abs(n)))", lambda r: (r.randint(-99999, 99999),)),
    ("gcd", "gcd(a: int, b: int) -> int", "returns the greatest common divisor of two non-negative ints",
     "def gcd(a, b):\n    while b:\n        a, b = b, a % b\n    return a",
     lambda r: (r.randint(0, 500), r.randint(0, 500))),
    ("fib", "fib(n: int) -> int", "returns the n-th Fibonacci number (fib(0) = 0, fib(1) = 1)",
     "def fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a",
     lambda r: (r.randint(0, 30),)),
    ("is_prime", "is_prime(n: int) -> bool", "returns whether n is a prime number",
     "def is_prime(n):\n    return n >= 2 and all(n % d for d in range(2, int(n ** 0.5) + 1))",
     lambda r: (r.randint(-5, 200),)),
]
_REFERENCE = {}
for _name, _, _, _src, _ in FAMILIES:
    exec(_src, _REFERENCE)  # our own reference solutions, defined above


def reference_solution(names: list[str]) -> str:
    """The reference code for the named functions (a correct answer, e.g. for SFT traces)."""
    sources = {f[0]: f[3] for f in FAMILIES}
    return "\n\n\n".join(sources[n] for n in names) + "\n"


def _call(name: str, args: tuple) -> str:
    return f"{name}({', '.join(repr(a) for a in args)})"


def synthetic_problem(rng: random.Random, difficulty: int) -> tuple[str, list[str], dict]:
    """(prompt, hidden tests, meta). Higher difficulty asks for more functions at once."""
    fams = rng.sample(FAMILIES, k=min(len(FAMILIES), max(1, difficulty)))
    specs, examples, tests = [], [], []
    for name, sig, desc, _, gen in fams:
        ref = _REFERENCE[name]
        specs.append(f"- `{sig}`: {desc}.")
        seen: set[str] = set()
        cases = []
        for _ in range(50):
            args = gen(rng)
            key = repr(args)
            if key not in seen:
                seen.add(key)
                cases.append(args)
            if len(cases) == VISIBLE_TESTS + HIDDEN_TESTS:
                break
        for i, args in enumerate(cases):
            want = ref(*args)
            if i < VISIBLE_TESTS:
                examples.append(f"assert {_call(name, args)} == {want!r}")
            elif want is None:
                tests.append(f"assert {_call(name, args)} is None")
            else:  # the type check stops a result whose __eq__ always says True
                tests.append(f"_r = {_call(name, args)}\nassert type(_r) is {type(want).__name__} and _r == {want!r}")
    prompt = ("Write Python code defining:\n" + "\n".join(specs) + "\nFor example:\n" + "\n".join(examples)
              + "\nAnswer with the code in one ```python block.")
    return prompt, tests, {"functions": [f[0] for f in fams]}


def load_code_jsonl(path: str) -> list[tuple[str, list[str]]]:
    """[(prompt, tests)] from {prompt, tests} lines; tests is a source string (one verdict) or a
    list of them (one verdict each)."""
    out = []
    try:
        with open(path) as f:
            lines = [ln for ln in f if ln.strip()]
    except OSError as e:
        raise ConfigError("env.code_path", f"cannot read {path!r}: {e}") from e
    for i, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError("env.code_path", f"{path}:{i}: not JSON ({e.msg})") from e
        tests = row.get("tests") if isinstance(row, dict) else None
        if isinstance(tests, str):
            tests = [tests]
        if not (isinstance(row.get("prompt"), str) and isinstance(tests, list) and tests
                and all(isinstance(t, str) for t in tests)):
            raise ConfigError("env.code_path", f"{path}:{i}: needs 'prompt' (str) and 'tests' (str or list of str)")
        out.append((row["prompt"], tests))
    if not out:
        raise ConfigError("env.code_path", f"{path} has no problems")
    return out
