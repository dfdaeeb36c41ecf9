"""The controller (in the trainer): prompts in, admitted rollout groups out.

It reads prompts through a checkpointed grain iterator, issues tasks through the replay queue
under admission control, waits for finished groups within the staleness bound, applies dynamic
sampling (drop zero-variance groups; fresh prompts refill the batch) and, when enabled,
difficulty-aware selection (stop issuing prompts that are always or never solved). Everything it
must remember across a restart is in ``state_dict()``, which the trainer checkpoints.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np

from rlax_tpu import tasks as tasks_lib
from rlax_tpu.replay import Admitted, ReplayController, is_zero_variance
from rlax_tpu.store import KVStore

log = logging.getLogger(__name__)


class CollectTimeout(RuntimeError):
    """No rollouts arrived in time: are inference workers running against this store?"""


class DifficultyTracker:
    """Per-prompt pass rates over its groups; prompts always or never solved are skipped."""

    def __init__(self, enabled: bool, min_groups: int, state: dict | None = None):
        self.enabled, self.min_groups = enabled, min_groups
        # prompt id -> [groups, solved samples, samples]
        self.stats: dict[str, list[int]] = {k: list(v) for k, v in (state or {}).items()}
        self.skipped = 0

    def observe(self, prompt_id: str, solved: int, samples: int) -> None:
        g = self.stats.setdefault(prompt_id, [0, 0, 0])
        g[0] += 1
        g[1] += solved
        g[2] += samples

    def keep(self, prompt_id: str) -> bool:
        if not self.enabled:
            return True
        g = self.stats.get(prompt_id)
        if g is None or g[0] < self.min_groups:
            return True
        ok = 0 < g[1] < g[2]
        self.skipped += 0 if ok else 1
        return ok

    def state_dict(self) -> dict:
        return {k: list(v) for k, v in self.stats.items()}


def _solved(sample) -> int:
    correct = sample.reward_details.get("correct") if isinstance(sample.reward_details, dict) else None
    return int(bool(correct)) if correct is not None else int(sample.reward > 0)


class Controller:
    def __init__(self, config, kv: KVStore, tokenizer, task, *, epoch: int, state: dict | None = None):
        self.config = config
        self.tokenizer = tokenizer
        self.group_size = config.rl.group_size
        self.sampling = {
            "temperature": float(config.inference.temperature),
            "top_k": int(config.inference.top_k),
            "top_p": float(config.inference.top_p),
            "max_new_tokens": int(config.inference.max_new_tokens),
        }
        state = state or {}
        self.replay = ReplayController.from_config(kv, config, epoch=epoch, state=state.get("replay"))
        dataset = tasks_lib.prompt_dataset(task, "train", config.seed)
        self._prompts = iter(dataset.to_iter_dataset())
        if state.get("data") is not None:
            self._prompts.set_state(state["data"])
        self.difficulty = DifficultyTracker(config.rl.difficulty_filter, config.rl.difficulty_min_groups,
                                            state.get("difficulty"))
        self.dropped_zero_variance = int(state.get("dropped_zero_variance", 0))

    # ------------------------------------------------------------------ issuing
    def _next_prompt(self) -> dict:
        for _ in range(10_000):
            problem = next(self._prompts)
            if self.difficulty.keep(problem["prompt_id"]):
                return problem
        raise RuntimeError("difficulty filter skipped 10000 prompts in a row: every prompt is always or "
                           "never solved (disable rl.difficulty_filter or change the task difficulty)")

    def fill(self, version: int) -> int:
        """Issues tasks for free slots; ``version`` is the trainer step the workers must use at least."""
        free = self.replay.free_slots()
        if free <= 0:
            return 0
        requests = []
        for _ in range(free):
            problem = self._next_prompt()
            requests.append(dict(
                prompt_id=problem["prompt_id"],
                prompt_tokens=self.tokenizer.encode_prompt(problem["prompt"]),
                spec={"problem": problem, "sampling": self.sampling},
                n_samples=self.group_size))
        self.replay.issue_many(requests, version)
        return len(requests)

    # ------------------------------------------------------------------ collecting
    def collect(self, step: int, num_groups: int, *, should_stop: Callable[[], bool], timeout_s: float,
                poll_s: float) -> tuple[list[Admitted], dict]:
        """Blocks until ``num_groups`` groups are admitted at ``step`` (sorted by task id)."""
        batch: list[Admitted] = []
        stats = {"dropped_stale": 0, "dropped_future": 0, "dropped_zero_variance": 0, "invalid": 0}
        start = last_progress = time.monotonic()
        while len(batch) < num_groups:
            if should_stop():
                return [], stats
            self.fill(version=step)
            res = self.replay.poll(step, limit=num_groups - len(batch))
            stats["dropped_stale"] += len(res.dropped_stale)
            stats["dropped_future"] += len(res.dropped_future)
            stats["invalid"] += len(res.invalid)
            for a in res.admitted:
                solved = sum(_solved(s) for s in a.group.samples)
                self.difficulty.observe(a.task.prompt_id, solved, len(a.group.samples))
                if self.config.rl.dynamic_sampling and is_zero_variance(a):
                    stats["dropped_zero_variance"] += 1
                    self.dropped_zero_variance += 1
                    continue
                batch.append(a)
            if res.admitted or res.dropped_stale or res.dropped_future:
                last_progress = time.monotonic()
            elif time.monotonic() - last_progress > timeout_s:
                raise CollectTimeout(
                    f"no rollout arrived for {timeout_s:.0f}s at step {step} ({len(batch)}/{num_groups} "
                    f"groups, {self.replay.in_flight} tasks in flight in {self.replay.kv.url}): are "
                    "inference workers running with the same store.url? (config.replay.collect_timeout_s)")
            if len(batch) < num_groups:
                time.sleep(poll_s)
        stats["wait_s"] = time.monotonic() - start
        batch.sort(key=lambda a: a.task.task_id)
        return batch, stats

    def group_metrics(self, groups: list[Admitted]) -> dict:
        rewards = np.array([s.reward for a in groups for s in a.group.samples], np.float32)
        solved = np.array([_solved(s) for a in groups for s in a.group.samples], np.float32)
        lengths = np.array([len(s.tokens) for a in groups for s in a.group.samples], np.float32)
        return {
            "reward/mean": float(rewards.mean()), "reward/std": float(rewards.std()),
            "reward/pass_rate": float(solved.mean()), "completion/len_mean": float(lengths.mean()),
            "completion/len_max": float(lengths.max()),
            "difficulty/skipped_total": self.difficulty.skipped,
            "dynamic_sampling/dropped_total": self.dropped_zero_variance,
        }

    def state_dict(self) -> dict:
        return {
            "replay": self.replay.state_dict(),
            "data": self._prompts.get_state(),
            "difficulty": self.difficulty.state_dict(),
            "dropped_zero_variance": self.dropped_zero_variance,
        }

    def close(self) -> None:
        self.replay.close()
