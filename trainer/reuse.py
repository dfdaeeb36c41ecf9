"""Rollout reuse (Motif-2's mixed-policy trajectory reuse): recently admitted groups train again.

Each admitted group that went into a batch may re-enter later batches, up to ``rl.reuse_max_uses``
times and while its weights are at most ``rl.reuse_max_age`` steps old, filling up to
``rl.reuse_fraction`` of a batch. A reused group keeps the behavior log-probs its worker stored,
so the off-policy correction (``rl.off_policy``: truncated IS or decoupled PPO against the
trainer's proximal recompute) weights it like any stale rollout.

The buffer holds task ids, not data: the groups' records stay in the store (the replay controller
keeps them past acks while they are retained here), so the buffer is a few numbers in the
controller's checkpointed state and a restart reloads the groups from the store.
"""

from __future__ import annotations

import dataclasses
import logging

from rlax_tpu import store_layout as keys
from rlax_tpu.kvstore import KVStore
from rlax_tpu.replay import RecordError, decode_rollout, decode_task
from trainer.replay_controller import Admitted

log = logging.getLogger(__name__)


@dataclasses.dataclass
class _Entry:
    task_id: str
    uses: int
    weights_step: int  # the group's oldest weights step: its age is judged by it


class ReuseBuffer:
    """The groups that may be trained on again, newest first."""

    def __init__(self, kv: KVStore, *, fraction: float, max_uses: int, max_age: int, state: dict | None = None):
        self.kv, self.fraction, self.max_uses, self.max_age = kv, float(fraction), int(max_uses), int(max_age)
        self._entries: list[_Entry] = [_Entry(str(t), int(u), int(w)) for t, u, w in (state or {}).get("entries", [])]
        self._cache: dict[str, Admitted] = {}
        self.reused_total = int((state or {}).get("reused_total", 0))

    @property
    def enabled(self) -> bool:
        return self.fraction > 0

    def retained(self) -> set[str]:
        """Task ids whose records must stay in the store."""
        return {e.task_id for e in self._entries}

    def __len__(self) -> int:
        return len(self._entries)

    def slots(self, batch_size: int) -> int:
        """How many of a batch's groups may be reused ones."""
        return int(self.fraction * batch_size) if self.enabled else 0

    def add(self, groups: list[Admitted]) -> None:
        """Fresh groups that went into a batch (each may be reused max_uses times)."""
        if not self.enabled:
            return
        for a in groups:
            self._entries.insert(0, _Entry(a.task.task_id, 0, a.group.min_weights_step))
            self._cache[a.task.task_id] = a

    def take(self, step: int, n: int) -> list[Admitted]:
        """Up to ``n`` groups to train on again at ``step``, the newest first; drops entries that
        are used up, too old, or whose records are gone."""
        self._entries = [e for e in self._entries if e.uses < self.max_uses and step - e.weights_step <= self.max_age]
        out = []
        for e in list(self._entries):
            if len(out) >= n:
                break
            a = self._load(e.task_id)
            if a is None:
                self._entries.remove(e)
                continue
            e.uses += 1
            out.append(dataclasses.replace(a, staleness=step - e.weights_step, reused=True))
        self._entries = [e for e in self._entries if e.uses < self.max_uses]
        self._cache = {t: a for t, a in self._cache.items() if t in self.retained()}
        self.reused_total += len(out)
        return out

    def _load(self, tid: str) -> Admitted | None:
        if tid in self._cache:
            return self._cache[tid]
        try:
            task_raw, group_raw = self.kv.get(keys.TASKS + tid), self.kv.get(keys.ROLLOUTS + tid)
            if task_raw is None or group_raw is None:
                raise RecordError("its task or rollout record is gone")
            a = Admitted(decode_task(task_raw), decode_rollout(group_raw), 0)
        except RecordError as e:
            log.warning("reuse: group %s cannot be reloaded (%s); dropped from the buffer", tid, e)
            return None
        self._cache[tid] = a
        return a

    def state_dict(self) -> dict:
        return {"entries": [[e.task_id, e.uses, e.weights_step] for e in self._entries],
                "reused_total": self.reused_total}

    def metrics(self, reused: list[Admitted], batch_size: int) -> dict:
        ages = [a.staleness for a in reused]
        return {"reuse/groups": len(reused), "reuse/fraction": len(reused) / max(batch_size, 1),
                "reuse/buffer": len(self._entries), "reuse/age_mean": sum(ages) / len(ages) if ages else 0.0,
                "reuse/total": self.reused_total}
