"""grain data sources of prompts: plain dicts, a stable repr, exact resume via get/set_state."""

from __future__ import annotations

import hashlib
import json

import grain

from rlax_tpu.tasks.base import Problem, Task


def _config_digest(task: Task) -> str:
    cfg = task.config.to_dict() if hasattr(task.config, "to_dict") else dict(task.config)
    text = json.dumps(cfg, sort_keys=True, default=str) + getattr(task, "digest", "")
    return hashlib.sha256(text.encode()).hexdigest()[:12]


class PromptSource:
    """A grain RandomAccessDataSource of problems as dicts (prompt_id, prompt, answer, meta).

    Synthetic training problems are generated lazily per index (any length is cheap); eval and
    JSONL problems are held in memory. repr() is stable across processes and names the task,
    split, seed, length and a digest of the task config, so grain's DataLoader.set_state can tell
    a checkpoint made for another dataset.
    """

    def __init__(self, task: Task, split: str, seed: int, num: int | None = None):
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        self.task, self.split, self.seed = task, split, int(seed)
        default = task.config.num_train if split == "train" else task.config.num_eval
        if split == "train" and hasattr(task, "split"):  # a dataset file: all of its train split
            default = len(task.split("train"))
        n = int(default if num is None else num)
        self._lazy = split == "train" and hasattr(task, "problem_at")
        if self._lazy:
            self._items: list[Problem] | None = None
            self._len = n
        else:
            get = task.train_problems if split == "train" else task.eval_problems
            self._items = get(n, self.seed)
            self._len = len(self._items)
        self._repr = (f"PromptSource(task={task.name!r}, split={split!r}, seed={self.seed}, "
                      f"len={self._len}, config={_config_digest(task)})")

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not 0 <= index < self._len:
            raise IndexError(f"{self._repr}: index {index} out of range")
        if self._lazy:
            return self.task.problem_at(self.split, self.seed, index).to_dict()
        return self._items[index].to_dict()

    def __repr__(self) -> str:
        return self._repr


def prompt_dataset(task: Task, split: str, seed: int, num: int | None = None,
                   shuffle: bool | None = None, repeat: bool | None = None) -> grain.MapDataset:
    """A grain MapDataset of problem dicts for split 'train' or 'eval'.

    num defaults to config.task.num_train (a JSONL task: its whole train split) / num_eval.
    train defaults to shuffle + repeat forever (a new order each epoch); eval to neither.
    Iterate with `iter(ds.to_iter_dataset())`; its get_state()/set_state() resume exactly.
    """
    is_train = split == "train"
    source = PromptSource(task, split, seed, num)
    ds = grain.MapDataset.source(source)
    if shuffle if shuffle is not None else is_train:
        ds = ds.shuffle(seed=int(seed))
    if repeat if repeat is not None else is_train:
        ds = ds.repeat()
    return ds
