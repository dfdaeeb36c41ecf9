"""Synthetic function-writing problems (strings, lists, arithmetic) with hidden unit tests, and
user problems from JSONL ({prompt, tests}). Expected values come from reference functions run
here, in-process, on generated inputs; the tests are plain `assert f(...) == ...` lines."""

from __future__ import annotations

import json
import math
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


def _second_largest(xs: list[int]) -> int | None:
    distinct = sorted(set(xs))
    return distinct[-2] if len(distinct) >= 2 else None


def _running(xs: list[int]) -> list[int]:
    out, total = [], 0
    for x in xs:
        total += x
        out.append(total)
    return out


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, math.isqrt(n) + 1))


def _fib(n: int) -> int:
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


# name, signature, description, reference, argument generator
FAMILIES: list[tuple[str, str, str, Callable, Callable[[random.Random], tuple]]] = [
    ("reverse_words", "reverse_words(s: str) -> str",
     "returns the words of s (split on spaces) in reverse order, joined by single spaces",
     lambda s: " ".join(reversed(s.split())), lambda r: (_words(r),)),
    ("count_vowels", "count_vowels(s: str) -> int", "returns how many of the letters of s are in 'aeiou'",
     lambda s: sum(c in "aeiou" for c in s), lambda r: (_words(r),)),
    ("capitalize_words", "capitalize_words(s: str) -> str",
     "returns s with the first letter of every space-separated word upper-cased",
     lambda s: " ".join(w[:1].upper() + w[1:] for w in s.split(" ")), lambda r: (_words(r),)),
    ("is_palindrome", "is_palindrome(s: str) -> bool", "returns whether s reads the same backwards",
     lambda s: s == s[::-1], lambda r: (r.choice(["abcba", "abba", "ab", "a", "", "xyzzyx", "level", "lever"]),)),
    ("sum_even", "sum_even(xs: list[int]) -> int", "returns the sum of the even numbers in xs",
     lambda xs: sum(x for x in xs if x % 2 == 0), lambda r: (_ints(r),)),
    ("second_largest", "second_largest(xs: list[int]) -> int | None",
     "returns the second largest distinct value in xs, or None if there are fewer than two",
     _second_largest, lambda r: (_ints(r),)),
    ("running_sum", "running_sum(xs: list[int]) -> list[int]",
     "returns the list of prefix sums of xs (element i is xs[0] + ... + xs[i])", _running, lambda r: (_ints(r),)),
    ("dedupe", "dedupe(xs: list[int]) -> list[int]",
     "returns xs without repeated values, keeping the first occurrence of each, in order",
     lambda xs: list(dict.fromkeys(xs)), lambda r: (_ints(r),)),
    ("digit_sum", "digit_sum(n: int) -> int", "returns the sum of the decimal digits of abs(n)",
     lambda n: sum(map(int, str(abs(n)))), lambda r: (r.randint(-99999, 99999),)),
    ("gcd", "gcd(a: int, b: int) -> int", "returns the greatest common divisor of two non-negative ints",
     math.gcd, lambda r: (r.randint(0, 500), r.randint(0, 500))),
    ("fib", "fib(n: int) -> int", "returns the n-th Fibonacci number (fib(0) = 0, fib(1) = 1)",
     _fib, lambda r: (r.randint(0, 30),)),
    ("is_prime", "is_prime(n: int) -> bool", "returns whether n is a prime number",
     _is_prime, lambda r: (r.randint(-5, 200),)),
]


def _call(name: str, args: tuple) -> str:
    return f"{name}({', '.join(repr(a) for a in args)})"


def synthetic_problem(rng: random.Random, difficulty: int) -> tuple[str, list[str], dict]:
    """(prompt, hidden tests, meta). Higher difficulty asks for more functions at once."""
    fams = rng.sample(FAMILIES, k=min(len(FAMILIES), max(1, difficulty)))
    specs, examples, tests = [], [], []
    for name, sig, desc, ref, gen in fams:
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
