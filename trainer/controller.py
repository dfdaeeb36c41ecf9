"""The controller (in the trainer): prompts in, admitted rollout groups out.

It reads prompts through a checkpointed grain iterator, issues tasks through the replay queue
under admission control, waits for finished groups within the staleness bound, applies dynamic
sampling (drop zero-variance groups; fresh prompts refill the batch), difficulty-aware selection
(stop issuing prompts that are always or never solved) and rollout reuse (recent groups fill part
of a batch again). Tasks name the newest weights step the trainer has published (or is
publishing), never one it may not publish. Everything it must remember across a restart is in
``state_dict()``, which the trainer checkpoints.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np

from rlax_tpu import envs
from rlax_tpu import store_layout as keys
from rlax_tpu import tasks as tasks_lib
from rlax_tpu.config import ConfigError
from rlax_tpu.envs.registry import EnvProblems
from rlax_tpu.kvstore import KVStore
from trainer.replay_controller import Admitted, ReplayController
from trainer.reuse import ReuseBuffer

log = logging.getLogger(__name__)


class CollectTimeout(RuntimeError):
    """No usable rollout group arrived in time; the message says what was seen (no worker alive,
    workers waiting for weights, every group dropped by a filter)."""


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


def is_zero_variance(admitted: Admitted) -> bool:
    """Every sample of the group that trains (not masked out) got the same reward: no learning
    signal (DAPO's filter)."""
    rewards = [s.reward for s in admitted.group.samples if np.any(s.loss_mask)]
    return len(rewards) == 0 or bool(np.ptp(rewards) == 0)


def _solved(sample) -> int:
    return int(tasks_lib.is_solved(sample.reward_details))


EPISODE_COUNTERS = ("turns", "tool_calls", "malformed_calls", "tool_errors", "token_mismatches", "env_tokens")


def episode_metrics(samples) -> dict:
    """The episodes' counters (reward_details, written by the rollout path) as step metrics:
    means per sample, the masked fraction (infrastructure failures left out of training) and the
    model tokens trained on."""
    out = {f"episode/{k}_mean": float(np.mean([float(s.reward_details.get(k, 0)) for s in samples]))
           for k in EPISODE_COUNTERS}
    out["episode/masked_frac"] = float(np.mean([not np.any(s.loss_mask) for s in samples]))
    out["episode/token_mismatches_total"] = int(sum(int(s.reward_details.get("token_mismatches", 0))
                                                    for s in samples))
    out["episode/model_tokens_mean"] = float(np.mean([int(np.sum(s.loss_mask)) for s in samples]))
    return out


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
        # config.env.name: the environment's problems and first messages (rendered as the
        # rollout path renders them); '' the task's prompts.
        self.env = None
        if config.env.name:
            if tokenizer.chat_template is None:
                raise ConfigError("env.name", f"environment {config.env.name!r} needs a tokenizer with a chat "
                                  "template (tokenizer.kind hf / gguf, tokenizer.use_chat_template)")
            self.env = envs.make_env(config, lambda text: len(tokenizer.encode(text)), problems_only=True)
            task = EnvProblems(self.env)
        dataset = tasks_lib.prompt_dataset(task, "train", config.seed)
        self._prompts = iter(dataset.to_iter_dataset())
        if state.get("data") is not None:
            self._prompts.set_state(state["data"])
        self.difficulty = DifficultyTracker(config.rl.difficulty_filter, config.rl.difficulty_min_groups,
                                            state.get("difficulty"))
        self.dropped_zero_variance = int(state.get("dropped_zero_variance", 0))
        r = config.rl
        self.reuse = ReuseBuffer(kv, fraction=r.reuse_fraction, max_uses=r.reuse_max_uses, max_age=r.reuse_max_age,
                                 state=state.get("reuse"))
        self.replay.retain(self.reuse.retained())

    # ------------------------------------------------------------------ issuing
    def _next_prompt(self) -> dict:
        for _ in range(10_000):
            problem = next(self._prompts)
            if self.difficulty.keep(problem["prompt_id"]):
                return problem
        raise RuntimeError("difficulty filter skipped 10000 prompts in a row: every prompt is always or "
                           "never solved (disable rl.difficulty_filter or change the task difficulty)")

    def _prompt(self, problem: dict) -> list[int]:
        if self.env is None:
            return self.tokenizer.encode_prompt(problem["prompt"])
        return envs.episode_prompt(self.tokenizer, self.env.reset(problem), self.env.tool_schemas() or None)

    def fill(self, weights_step: int) -> int:
        """Issues tasks for free slots, to be generated with the weights of ``weights_step`` or newer."""
        free = self.replay.free_slots()
        if free <= 0:
            return 0
        requests = []
        for _ in range(free):
            problem = self._next_prompt()
            requests.append(dict(
                prompt_id=problem["prompt_id"],
                prompt_tokens=self._prompt(problem),
                spec={"problem": problem, "sampling": self.sampling},
                n_samples=self.group_size))
        self.replay.issue_many(requests, weights_step)
        return len(requests)

    # ------------------------------------------------------------------ collecting
    def collect(self, step: int, num_groups: int, *, weights_step: int, should_stop: Callable[[], bool],
                timeout_s: float, poll_s: float) -> tuple[list[Admitted], dict]:
        """Blocks until ``num_groups`` groups are admitted at trainer ``step``: reused ones first
        (rollout reuse), then fresh ones, the fresh tasks issued for ``weights_step`` (the newest
        step the trainer has published or is publishing). Returns them sorted by task id, and
        stats. Raises CollectTimeout after ``timeout_s`` without a usable group."""
        reused = self.reuse.take(step, self.reuse.slots(num_groups))
        fresh, stats = self._collect_fresh(step, num_groups - len(reused), weights_step, should_stop, timeout_s,
                                           poll_s)
        if not fresh and num_groups - len(reused) > 0:  # stopped
            return [], stats
        self.reuse.add(fresh)
        self.replay.retain(self.reuse.retained())
        if self.reuse.enabled:
            stats.update(self.reuse.metrics(reused, num_groups))
        batch = sorted(fresh + reused, key=lambda a: a.task.task_id)
        return batch, stats

    def _collect_fresh(self, step, num_groups, weights_step, should_stop, timeout_s, poll_s):
        batch: list[Admitted] = []
        stats = {"dropped_stale": 0, "dropped_future": 0, "dropped_zero_variance": 0, "invalid": 0}
        start = last_kept = time.monotonic()
        dropped_since_kept = 0
        while len(batch) < num_groups:
            if should_stop():
                return [], stats
            self.fill(weights_step=weights_step)
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
                    dropped_since_kept += 1
                    continue
                batch.append(a)
                last_kept, dropped_since_kept = time.monotonic(), 0
            dropped_since_kept += len(res.dropped_stale) + len(res.dropped_future) + len(res.invalid)
            if time.monotonic() - last_kept > timeout_s:
                raise CollectTimeout(self._diagnose(step, weights_step, len(batch), num_groups, timeout_s,
                                                    arrived=dropped_since_kept > 0, stats=stats))
            if len(batch) < num_groups:
                time.sleep(poll_s)
        stats["wait_s"] = time.monotonic() - start
        return batch, stats

    def _diagnose(self, step, weights_step, have, want, timeout_s, *, arrived: bool, stats: dict) -> str:
        """Why no usable group came: from the workers' heartbeats and what did arrive."""
        c = self.config
        head = (f"no usable rollout group for {timeout_s:.0f}s at step {step} ({have}/{want} groups, "
                f"{self.replay.in_flight} tasks in flight for weights step {weights_step} in {self.replay.kv.url}; "
                "config.replay.collect_timeout_s): ")
        if arrived:
            return head + (f"groups arrived but all were dropped: {stats['dropped_zero_variance']} by dynamic "
                           f"sampling (every sample got the same reward: rl.dynamic_sampling), "
                           f"{stats['dropped_stale']} too stale (rl.max_staleness={c.rl.max_staleness}), "
                           f"{stats['dropped_future']} from weights newer than this step (a restart discarded "
                           f"them), {stats['invalid']} invalid")
        now, alive, behind = time.time(), [], []
        for key, entry in self.replay.kv.iter_values(keys.WORKERS):
            name = key[len(keys.WORKERS):]
            try:
                hb = keys.Heartbeat.decode(entry.value, name)
            except keys.HeartbeatError:
                continue
            if hb.alive(c.replay.heartbeat_seconds, now):
                alive.append(name)
                if hb.weights_step is not None and hb.weights_step < weights_step:
                    behind.append(f"{name} (step {hb.weights_step})")
        if not alive:
            return head + ("no inference worker is alive (no fresh heartbeat under workers/): start workers "
                           "with the same store.url")
        if behind and len(behind) == len(alive):
            return head + (f"every live worker waits for the weights of step {weights_step} and holds older ones: "
                           f"{', '.join(behind)}; is the trainer's publish reaching the store?")
        return head + f"{len(alive)} worker(s) alive ({', '.join(alive)}) but no group came back"

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
            **episode_metrics([s for a in groups for s in a.group.samples]),
        }

    def state_dict(self) -> dict:
        return {
            "replay": self.replay.state_dict(),
            "data": self._prompts.get_state(),
            "difficulty": self.difficulty.state_dict(),
            "dropped_zero_variance": self.dropped_zero_variance,
            "reuse": self.reuse.state_dict(),
        }

    def close(self) -> None:
        self.replay.close()
