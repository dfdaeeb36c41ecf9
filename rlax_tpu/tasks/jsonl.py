"""User prompt datasets in JSONL ({"prompt": ..., "answer": ...} per line), scored by the math
verifier (or exact match), with an optional format reward. See docs/tasks.md."""

from __future__ import annotations

import hashlib
import json
import os
import random

from rlax_tpu.config.errors import ConfigError
from rlax_tpu.tasks.base import Problem, Reward, Task, combine, is_eval_prompt, prompt_id_for
from rlax_tpu.tasks.math_verify import verify


class DatasetError(ValueError):
    """A bad dataset file or line; the message names the file, the line and the field."""


def load_jsonl(path: str, prompt_field: str = "prompt", answer_field: str = "answer",
               id_field: str = "", config_field: str = "task.path") -> list[Problem]:
    """Reads problems from a JSONL file. Blank lines are skipped; extra fields go to meta."""
    if not os.path.isfile(path):
        raise ConfigError(config_field, f"JSONL dataset file not found: {path!r}")
    problems, seen_ids = [], {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DatasetError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            for field in (prompt_field, answer_field) + ((id_field,) if id_field else ()):
                if field not in obj:
                    raise DatasetError(f"{where}: missing field {field!r} "
                                       f"(fields present: {sorted(obj)[:10]})")
            prompt, answer = obj[prompt_field], obj[answer_field]
            if not isinstance(prompt, str) or not prompt.strip():
                raise DatasetError(f"{where}: field {prompt_field!r} must be a non-empty string")
            if isinstance(answer, (int, float)) and not isinstance(answer, bool):
                answer = str(answer)
            if not isinstance(answer, str):
                raise DatasetError(f"{where}: field {answer_field!r} must be a string or a number")
            pid = str(obj[id_field]) if id_field else prompt_id_for("jsonl", prompt)
            if id_field and pid in seen_ids:
                raise DatasetError(f"{where}: duplicate {id_field!r} {pid!r} "
                                   f"(first on line {seen_ids[pid]})")
            seen_ids[pid] = lineno
            meta = {k: v for k, v in obj.items() if k not in (prompt_field, answer_field, id_field)
                    and isinstance(v, (str, int, float, bool))}
            meta["line"] = lineno
            problems.append(Problem(pid, prompt, answer, meta))
    if not problems:
        raise DatasetError(f"{path}: no problems (the file is empty)")
    return problems


def file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


class JsonlTask(Task):
    name = "jsonl"

    def __init__(self, config):
        super().__init__(config)
        c = config
        fields = dict(prompt_field=c.prompt_field, answer_field=c.answer_field, id_field=c.id_field)
        everything = load_jsonl(c.path, **fields, config_field="task.path")
        if c.eval_path:
            self._train = everything
            self._eval = load_jsonl(c.eval_path, **fields, config_field="task.eval_path")
            train_prompts = {p.prompt for p in self._train}
            self._eval = [p for p in self._eval if p.prompt not in train_prompts]
        else:
            frac = float(c.eval_fraction)
            self._train = [p for p in everything if not is_eval_prompt(p.prompt, frac)]
            self._eval = [p for p in everything if is_eval_prompt(p.prompt, frac)]
        if not self._train:
            raise ConfigError("task.path", f"no training problems left in {c.path!r} after the split")
        self.digest = file_digest(c.path) + (f"+{file_digest(c.eval_path)}" if c.eval_path else "")

    def split(self, split: str) -> list[Problem]:
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        return self._train if split == "train" else self._eval

    def _sample(self, items: list[Problem], n: int, seed: int) -> list[Problem]:
        order = list(range(len(items)))
        random.Random(f"jsonl:{seed}").shuffle(order)
        return [items[i] for i in order[:n]]

    def train_problems(self, n: int, seed: int) -> list[Problem]:
        """Up to n training problems in a seeded order (at most the whole training split)."""
        return self._sample(self._train, n, seed)

    def eval_problems(self, n: int, seed: int) -> list[Problem]:
        """Up to n held-out problems (at most the whole held-out split)."""
        return self._sample(self._eval, n, seed)

    def solution_text(self, problem: Problem) -> str:
        """The dataset's answer; when it is a bare answer, framed in the required format."""
        ans = problem.answer
        if "####" in ans or "\\boxed" in ans:
            return ans
        if self.config.answer_format == "boxed":
            return f"The answer is \\boxed{{{ans}}}."
        return f"#### {ans}"

    def corpus(self):
        for p in self._train + self._eval:
            yield p.prompt
            yield self.solution_text(p)

    def score(self, problem: Problem, completion: str) -> Reward:
        c = self.config
        details = verify(completion, problem.answer, style=c.answer_format, mode=c.verifier,
                         deadline=self._deadline())
        cw, fw = self._weights()
        return Reward(combine(details["correct"], details["format_ok"], cw, fw), details)
