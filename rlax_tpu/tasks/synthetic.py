"""Shared machinery of the in-process synthetic tasks: seeded generation and the held-out split.

Problem i of (split, seed) comes from its own RNG, random.Random(f"{name}:{split}:{seed}:{i}"),
so any problem can be made on its own (lazy grain sources) and is identical in every process.
Train and eval are disjoint by content: a prompt belongs to eval iff a hash of its text falls
under task.eval_fraction; each split rejects the other's prompts.
"""

from __future__ import annotations

import random

from rlax_tpu.config.errors import ConfigError
from rlax_tpu.tasks.answers import extract_answer
from rlax_tpu.tasks.base import Problem, Reward, Task, combine, is_eval_prompt, prompt_id_for

ANSWER_MARK = "####"
_MAX_REJECTS = 1000


class SyntheticTask(Task):
    """Subclasses implement generate(rng, difficulty), solution_text() and check()."""

    default_max_number = 9

    def __init__(self, config):
        super().__init__(config)
        c = config
        self.train_range = (int(c.min_difficulty), int(c.difficulty))
        self.eval_range = (int(c.eval_min_difficulty or c.min_difficulty),
                           int(c.eval_difficulty or c.difficulty))
        self.max_number = int(c.max_number or self.default_max_number)
        self.eval_fraction = float(c.eval_fraction)
        # '####' unless asked otherwise: the form the SFT traces teach.
        fmt = c.get("answer_format", "any")
        self.answer_style = "hash" if fmt == "any" else fmt
        instruction = c.get("instruction", "auto")
        self.instruction = "" if instruction == "auto" else instruction
        if not 0.0 < self.eval_fraction < 1.0:
            raise ConfigError("task.eval_fraction", f"must be in (0, 1) for task "
                              f"{self.name!r}, got {self.eval_fraction}")

    # --- subclass API ---------------------------------------------------------------------
    def generate(self, rng: random.Random, difficulty: int) -> tuple[str, str, dict]:
        """Returns (prompt, answer, meta) for one problem of the given difficulty."""
        raise NotImplementedError

    def check(self, problem: Problem, answer: str) -> tuple[bool, bool, str]:
        """Checks an extracted '####' answer: (format_ok, correct, reason)."""
        raise NotImplementedError

    # --- problems -------------------------------------------------------------------------
    def problem_at(self, split: str, seed: int, index: int) -> Problem:
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        lo, hi = self.train_range if split == "train" else self.eval_range
        rng = random.Random(f"{self.name}:{split}:{seed}:{index}")
        want_eval = split == "eval"
        for _ in range(_MAX_REJECTS):
            difficulty = rng.randint(lo, hi)
            prompt, answer, meta = self.generate(rng, difficulty)
            if is_eval_prompt(prompt, self.eval_fraction) == want_eval:  # by the question alone
                meta = {"task": self.name, "difficulty": difficulty, **meta}
                pid = prompt_id_for(self.name, prompt)
                if self.instruction:
                    prompt = f"{prompt}\n{self.instruction}"
                return Problem(pid, prompt, answer, meta)
        raise ConfigError("task.eval_fraction", f"{self.name}: no {split} problem in {_MAX_REJECTS} "
                          f"draws at difficulty {lo}..{hi}; the problem space is too small for "
                          f"eval_fraction={self.eval_fraction} (raise the difficulty or max_number)")

    def train_problems(self, n: int, seed: int) -> list[Problem]:
        """n training problems (duplicates possible when the problem space is small)."""
        return [self.problem_at("train", seed, i) for i in range(n)]

    def eval_problems(self, n: int, seed: int) -> list[Problem]:
        """n distinct held-out problems."""
        out, seen, i = [], set(), 0
        while len(out) < n:
            if i > 50 * n + 1000:
                raise ConfigError("task.num_eval", f"only {len(out)} distinct held-out {self.name} "
                                  f"problems exist in difficulty range {self.eval_range}; ask for fewer "
                                  "or raise task.eval_fraction / the difficulty")
            p = self.problem_at("eval", seed, i)
            i += 1
            if p.prompt not in seen:
                seen.add(p.prompt)
                out.append(p)
        return out

    # --- reward ---------------------------------------------------------------------------
    def score(self, problem: Problem, completion: str) -> Reward:
        answer, _ = extract_answer(completion, self.answer_style)
        if answer is None:
            details = {"correct": False, "format_ok": False, "extracted": None, "reason": "no_answer"}
        else:
            format_ok, correct, reason = self.check(problem, answer)
            details = {"correct": correct, "format_ok": format_ok, "extracted": answer[:200],
                       "reason": reason}
        cw, fw = self._weights()
        return Reward(combine(details["correct"], details["format_ok"], cw, fw), details)
