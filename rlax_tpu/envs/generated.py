"""Seeded problem generation for the in-process environments, split by prompt hash like the
synthetic tasks: problem i of (split, seed) comes from its own RNG and is the same everywhere."""

from __future__ import annotations

import random

from rlax_tpu.config.errors import ConfigError
from rlax_tpu.tasks.base import Problem, is_eval_prompt, prompt_id_for

_MAX_REJECTS = 1000


class Generated:
    """Mixin: subclasses define name and generate(rng, difficulty) -> (prompt, answer, meta);
    difficulty ranges and the held-out fraction come from config.task."""

    name: str

    def _ranges(self, task) -> None:
        self.train_range = (int(task.min_difficulty), int(task.difficulty))
        self.eval_range = (int(task.eval_min_difficulty or task.min_difficulty),
                           int(task.eval_difficulty or task.difficulty))
        self.eval_fraction = float(task.eval_fraction)

    def generate(self, rng: random.Random, difficulty: int) -> tuple[str, str, dict]:
        raise NotImplementedError

    def problem_at(self, split: str, seed: int, index: int) -> Problem:
        lo, hi = self.train_range if split == "train" else self.eval_range
        rng = random.Random(f"{self.name}:{split}:{seed}:{index}")
        for _ in range(_MAX_REJECTS):
            difficulty = rng.randint(lo, hi)
            prompt, answer, meta = self.generate(rng, difficulty)
            if is_eval_prompt(prompt, self.eval_fraction) == (split == "eval"):
                return Problem(prompt_id_for(self.name, prompt), prompt, answer,
                               {"env": self.name, "difficulty": difficulty, **meta})
        raise ConfigError("task.eval_fraction", f"{self.name}: no {split} problem in {_MAX_REJECTS} draws")

    def train_problems(self, n: int, seed: int) -> list[Problem]:
        return [self.problem_at("train", seed, i) for i in range(n)]

    def eval_problems(self, n: int, seed: int) -> list[Problem]:
        out, seen, i = [], set(), 0
        while len(out) < n and i < 50 * n + 1000:
            p = self.problem_at("eval", seed, i)
            i += 1
            if p.prompt_id not in seen:
                seen.add(p.prompt_id)
                out.append(p)
        return out
