"""Plain-data problems and rewards, the Task interface, and the crash-proof reward wrapper."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

# Completions longer than this are cut (keeping the tail, where the final answer is) before any
# parsing, so a runaway generation cannot make a verifier slow.
MAX_COMPLETION_CHARS = 20_000


class RewardTimeout(Exception):
    """A verifier ran past its wall-clock budget (checked cooperatively while parsing)."""


class Deadline:
    """A cooperative wall-clock budget: parsers call check() in their loops."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def check(self) -> None:
        if time.monotonic() > self.end:
            raise RewardTimeout("reward parsing ran past its time budget")


@dataclasses.dataclass(frozen=True)
class Problem:
    """One prompt with its reference answer. Plain data: crosses processes as a dict."""

    prompt_id: str
    prompt: str
    answer: str
    meta: dict = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"prompt_id": self.prompt_id, "prompt": self.prompt, "answer": self.answer,
                "meta": dict(self.meta)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Problem:
        return cls(prompt_id=str(d["prompt_id"]), prompt=str(d["prompt"]), answer=str(d["answer"]),
                   meta=dict(d.get("meta") or {}))


@dataclasses.dataclass(frozen=True)
class Reward:
    """A scalar reward and why. details always has 'correct' (bool) and 'reason' (str)."""

    score: float
    details: dict = dataclasses.field(default_factory=dict)

    @property
    def correct(self) -> bool:
        return is_solved(self.details)


def is_solved(details: dict) -> bool:
    """Whether a scored completion counts as solved (pass@k, pass rates, difficulty): the
    verifier's 'correct' verdict, which every reward carries (safe_reward fills it in)."""
    return bool(isinstance(details, dict) and details.get("correct", False))


def stable_hash(text: str) -> int:
    """A process-independent 64-bit hash (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def prompt_id_for(namespace: str, prompt: str) -> str:
    return f"{namespace}-{hashlib.sha256(prompt.encode('utf-8')).hexdigest()[:16]}"


def is_eval_prompt(prompt: str, eval_fraction: float) -> bool:
    """Held-out membership by content: a prompt is in eval iff its hash falls below the fraction."""
    return (stable_hash("split:" + prompt) % 1_000_000) < int(round(eval_fraction * 1_000_000))


def combine(correct: bool, format_ok: bool, correct_weight: float, format_weight: float) -> float:
    return correct_weight * float(correct) + format_weight * float(format_ok)


def clip_completion(completion: str) -> str:
    """Type-checks a completion and keeps its last MAX_COMPLETION_CHARS (the final answer's end)."""
    if not isinstance(completion, str):
        raise TypeError(f"completion must be str, got {type(completion).__name__}")
    return completion[-MAX_COMPLETION_CHARS:] if len(completion) > MAX_COMPLETION_CHARS else completion


def safe_reward(fn: Callable[[Problem, str], Reward], problem: Problem, completion: str) -> Reward:
    """Calls fn(problem, completion); any exception or a non-finite score gives reward 0.

    The reason lands in details['reason'] ('timeout', 'error', 'bad_score') and the exception
    text in details['error'], so a bad completion or a buggy verifier never crashes a worker.
    """
    t0 = time.monotonic()
    try:
        out = fn(problem, clip_completion(completion))
        score = float(out.score)
        if not math.isfinite(score):
            return Reward(0.0, {"correct": False, "reason": "bad_score", "error": f"score={score!r}"})
        details = dict(out.details)
        details.setdefault("correct", False)
        details.setdefault("reason", "")
        return Reward(score, details)
    except RewardTimeout as e:
        return Reward(0.0, {"correct": False, "reason": "timeout", "error": str(e),
                            "elapsed_s": time.monotonic() - t0})
    except Exception as e:  # noqa: BLE001 - the whole point: never crash the caller
        return Reward(0.0, {"correct": False, "reason": "error", "error": f"{type(e).__name__}: {e}"[:500]})


class Task:
    """A source of problems plus a verifier. Subclasses implement the abstract parts."""

    name: str = "task"

    def __init__(self, config):
        self.config = config

    # --- problems -----------------------------------------------------------------------
    def train_problems(self, n: int, seed: int) -> list[Problem]:
        raise NotImplementedError

    def eval_problems(self, n: int, seed: int) -> list[Problem]:
        """n distinct held-out problems, disjoint from every train_problems() output."""
        raise NotImplementedError

    def solution_text(self, problem: Problem) -> str:
        """The SFT target: worked steps and the final answer in the task's answer format."""
        raise NotImplementedError

    def corpus(self) -> Iterator[str]:
        """Text for tokenizer training: prompts and solutions from both splits."""
        cfg = self.config
        n_train = min(int(cfg.num_train), 2000)
        n_eval = min(int(cfg.num_eval), 200)
        for p in self.train_problems(n_train, seed=0) + self.eval_problems(n_eval, seed=0):
            yield p.prompt
            yield self.solution_text(p)

    # --- reward -------------------------------------------------------------------------
    def score(self, problem: Problem, completion: str) -> Reward:
        """The raw verifier; may raise on pathological input. Prefer reward()."""
        raise NotImplementedError

    def reward(self, problem: Problem | dict, completion: str) -> Reward:
        """Never raises: exceptions and timeouts give 0 with the reason in details."""
        if isinstance(problem, dict):
            problem = Problem.from_dict(problem)
        return safe_reward(self.score, problem, completion)

    def rewards(self, problems: Sequence[Problem | dict], completions: Sequence[str]) -> list[Reward]:
        """reward() for each (problem, completion) pair; tasks whose checks run in a process
        pool submit the whole batch (e.g. a group) at once. Never raises per item."""
        if len(problems) != len(completions):
            raise ValueError(f"{len(problems)} problems but {len(completions)} completions")
        return [self.reward(p, c) for p, c in zip(problems, completions, strict=True)]

    def _weights(self) -> tuple[float, float]:
        return float(self.config.correct_weight), float(self.config.format_weight)

    def _deadline(self) -> Deadline:
        return Deadline(float(self.config.reward_timeout_s))
