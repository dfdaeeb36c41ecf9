"""The controller half of the replay queue (the trainer's side; workers hold the other half in
inference_worker.replay_client, and the wire format is rlax_tpu.replay).

It issues tasks under admission control, admits finished rollout groups within the staleness
bound, and deletes consumed records only once the checkpoint covering them is committed. Its
whole state is a small JSON-able dict the trainer checkpoints (see ``state_dict``).

Restart semantics (a restart from a checkpoint loses no issued or finished work): a controller
restored from state C re-issues task ids from C's ``next_task_id`` on, so tasks issued after C
keep their ids. A re-issued task whose bytes match the stored one keeps its lease and rollout
(no work is lost); one whose content differs overwrites it, and a rollout carrying the old
task's digest is discarded. Rollouts admitted after C are admitted again, once, because their
records are deleted only by ``ack``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from rlax_tpu import fencing
from rlax_tpu import store_layout as keys
from rlax_tpu.kvstore import KVStore
from rlax_tpu.replay.records import (
    RecordError,
    RolloutGroup,
    Task,
    decode_rollout,
    decode_task,
    encode_task,
    task_digest,
)

log = logging.getLogger(__name__)
STATE_SCHEMA = 1
COUNTERS = ("issued", "reissued_same", "reissued_changed", "admitted", "dropped_stale", "dropped_future",
            "corrupt",
            "mismatched", "task_missing", "garbage_deleted", "acked")


class QueueFull(RuntimeError):
    """issue() was called with max_in_flight tasks already outstanding."""


@dataclasses.dataclass(frozen=True)
class Admitted:
    """A rollout group admitted for training, with the task it answers."""

    task: Task
    group: RolloutGroup
    staleness: int  # trainer step - the group's oldest weights step
    reused: bool = False  # trained on before (rollout reuse)


@dataclasses.dataclass
class PollResult:
    admitted: list[Admitted]
    dropped_stale: list[str]  # task ids whose rollout was too stale: the task is generated again
    invalid: list[str]  # task ids whose rollout was corrupt or answered another task: redone too
    # task ids whose rollout came from weights newer than the trainer's step: a future that a
    # restart from an older checkpoint discarded. Redone with the current weights.
    dropped_future: list[str] = dataclasses.field(default_factory=list)


def _derive_seed(base: int, number: int) -> int:
    return int(np.random.SeedSequence([base, number]).generate_state(1, np.uint64)[0] >> np.uint64(1))


class ReplayController:
    """Issues tasks and admits rollout groups. One per run, in the trainer process.

    ``epoch``: the trainer epoch from ``fencing.acquire_epoch``; when given, every write the
    controller makes is preceded by ``fencing.check_epoch`` (a stale trainer gets FencedError).
    """

    def __init__(self, kv: KVStore, *, max_in_flight: int, max_staleness: int, epoch: int | None = None,
                 seed: int = 0, state: dict | None = None, committed: bool = True):
        if max_in_flight <= 0:
            raise ValueError(f"max_in_flight must be positive, got {max_in_flight}")
        if max_staleness < 0:
            raise ValueError(f"max_staleness must be non-negative, got {max_staleness}")
        self.kv = kv
        self.max_in_flight = int(max_in_flight)
        self.max_staleness = int(max_staleness)
        self.epoch = epoch
        self.seed = int(seed)
        self._next = 0
        self._issued: dict[str, str] = {}  # outstanding task id -> task digest
        self._consumed: set[str] = set()  # admitted, records not yet deleted (awaiting ack)
        self._retained: set[str] = set()  # consumed ones whose records must outlive acks (reuse)
        self.counters = dict.fromkeys(COUNTERS, 0)
        self._pool = ThreadPoolExecutor(8, thread_name_prefix="replay-ctl")
        if state is not None:
            self._load_state(state)
            if committed:  # the state we restored from is a committed checkpoint: finish its ack
                self.ack(state)

    @classmethod
    def from_config(cls, kv: KVStore, config, *, epoch: int | None = None, state: dict | None = None,
                    committed: bool = True) -> ReplayController:
        from rlax_tpu.config.sections import replay as replay_section

        return cls(kv, max_in_flight=replay_section.max_in_flight(config),
                   max_staleness=config.rl.max_staleness, epoch=epoch, seed=config.seed, state=state,
                   committed=committed)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        """The checkpointable state (JSON-able). See docs/replay.md for the format."""
        return {
            "schema": STATE_SCHEMA,
            "next_task_id": self._next,
            "issued": dict(sorted(self._issued.items())),
            "consumed": sorted(self._consumed),
            "retained": sorted(self._retained),
            "counters": dict(self.counters),
        }

    def _load_state(self, state: dict) -> None:
        try:
            if state.get("schema") != STATE_SCHEMA:
                raise ValueError(f"schema {state.get('schema')!r}, expected {STATE_SCHEMA}")
            self._next = int(state["next_task_id"])
            self._issued = {str(k): str(v) for k, v in state["issued"].items()}
            self._consumed = {str(k) for k in state["consumed"]}
            self._retained = {str(k) for k in state.get("retained", [])} & self._consumed
            for k, v in state.get("counters", {}).items():
                self.counters[k] = int(v)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"replay controller state is invalid ({e}); refusing to guess") from e

    @property
    def in_flight(self) -> int:
        return len(self._issued)

    @property
    def next_task_number(self) -> int:
        return self._next

    def free_slots(self) -> int:
        return max(0, self.max_in_flight - len(self._issued))

    def _fence(self) -> None:
        if self.epoch is not None:
            fencing.check_epoch(self.kv, self.epoch)

    # ------------------------------------------------------------------ issuing

    def issue(self, prompt_id: str, prompt_tokens, spec: dict, n_samples: int, weights_step: int,
              seed: int | None = None) -> Task:
        """Writes the next task; raises QueueFull when max_in_flight tasks are outstanding."""
        return self.issue_many([dict(prompt_id=prompt_id, prompt_tokens=prompt_tokens, spec=spec,
                                     n_samples=n_samples, seed=seed)], weights_step)[0]

    def issue_many(self, requests: Sequence[dict], weights_step: int) -> list[Task]:
        """Issues several tasks at once (their writes run concurrently), each to be generated
        with the published weights of ``weights_step`` or newer.

        Each request is a dict of ``issue`` arguments: prompt_id, prompt_tokens, spec, n_samples
        and optionally seed. Raises QueueFull (issuing nothing) if they do not all fit.
        """
        if len(requests) > self.free_slots():
            raise QueueFull(f"{len(requests)} tasks do not fit: {len(self._issued)} in flight, "
                            f"max_in_flight={self.max_in_flight}")
        self._fence()
        tasks = []
        for i, r in enumerate(requests):
            number = self._next + i
            seed = r.get("seed")
            seed = _derive_seed(self.seed, number) if seed is None else int(seed)
            tasks.append(Task(
                task_id=keys.task_id(number), prompt_id=str(r["prompt_id"]),
                prompt_tokens=np.asarray(r["prompt_tokens"], np.int32), spec=dict(r["spec"]),
                n_samples=int(r["n_samples"]), seed=seed, weights_step=int(weights_step)))
        outcomes = list(self._pool.map(self._write_task, tasks))
        for task, (dig, outcome) in zip(tasks, outcomes, strict=True):
            self._issued[task.task_id] = dig
            if outcome:
                self.counters[outcome] += 1
        self._next += len(tasks)
        self.counters["issued"] += len(tasks)
        return tasks

    def _write_task(self, task: Task) -> tuple[str, str]:
        """Creates the task record; returns (digest, counter to bump or '')."""
        dig = task_digest(task)
        key = keys.TASKS + task.task_id
        if not self.kv.create(key, encode_task(task)):
            # Issued before a restart from an older state: keep it if it asks for the same work,
            # else replace it (a rollout of the old content is then rejected by its digest).
            try:
                same = task_digest(decode_task(self.kv.get(key))) == dig
            except RecordError:
                same = False
            if same:
                return dig, "reissued_same"
            log.info("replay: task %s re-issued with different content; replacing it", task.task_id)
            self.kv.put(key, encode_task(task))
            return dig, "reissued_changed"
        return dig, ""

    # ------------------------------------------------------------------ admitting

    def poll(self, step: int, limit: int | None = None) -> PollResult:
        """Admits finished groups (oldest task first) at trainer ``step``, at most ``limit``.

        A group is admitted only if ``step - group.min_weights_step <= max_staleness``; a staler one is
        deleted so that its task is generated again, and so is one with a sample from weights newer
        than ``step`` (published by a trainer whose progress a restart discarded). Admitted groups
        count as consumed in the state: pass ``limit`` so that only groups this step will train on
        are taken.
        """
        result = PollResult([], [], [])
        ready = [t for t in keys.ids_under(self.kv.list(keys.ROLLOUTS), keys.ROLLOUTS)]
        garbage = []
        for tid in ready:
            if limit is not None and len(result.admitted) >= limit:
                break
            if tid in self._consumed:
                continue
            if tid not in self._issued:
                if keys.task_number(tid) < self._next:
                    garbage.append(tid)  # acked earlier (or orphaned by a late write): not ours
                continue  # a future id from before a restart: judged when it is re-issued
            self._consider(tid, step, result)
        if garbage:
            self._delete_records(garbage, only=(keys.ROLLOUTS,))
            self.counters["garbage_deleted"] += len(garbage)
        return result

    def _consider(self, tid: str, step: int, result: PollResult) -> None:
        rkey = keys.ROLLOUTS + tid
        entry = self.kv.read(rkey)
        if not entry.exists:
            return
        try:
            group = decode_rollout(entry.value)
            if group.task_id != tid:
                raise RecordError(f"rollout under {rkey} answers task {group.task_id!r}")
        except RecordError as e:
            log.warning("replay: corrupt rollout %s skipped and deleted: %s", rkey, e)
            self.counters["corrupt"] += 1
            self._discard(rkey, entry.generation)
            result.invalid.append(tid)
            return
        if group.task_digest != self._issued[tid]:
            log.info("replay: rollout %s answers an older version of the task; discarded", rkey)
            self.counters["mismatched"] += 1
            self._discard(rkey, entry.generation)
            result.invalid.append(tid)
            return
        traw = self.kv.get(keys.TASKS + tid)
        try:
            if traw is None:
                raise RecordError("task record is missing")
            task = decode_task(traw)
        except RecordError as e:
            # Our own record: someone else wrote or removed it. Keep the rollout for inspection.
            log.error("replay: task %s unusable (%s); its rollout is not admitted", tid, e)
            self.counters["task_missing"] += 1
            return
        if len(group.samples) != task.n_samples:
            log.warning("replay: rollout %s has %d samples, task wants %d; discarded", rkey,
                        len(group.samples), task.n_samples)
            self.counters["corrupt"] += 1
            self._discard(rkey, entry.generation)
            result.invalid.append(tid)
            return
        if max(s.weights_step for s in group.samples) > step:
            self.counters["dropped_future"] += 1
            self._discard(rkey, entry.generation)
            result.dropped_future.append(tid)
            return
        staleness = step - group.min_weights_step
        if staleness > self.max_staleness:
            self.counters["dropped_stale"] += 1
            self._discard(rkey, entry.generation)
            result.dropped_stale.append(tid)
            return
        del self._issued[tid]
        self._consumed.add(tid)
        self.counters["admitted"] += 1
        result.admitted.append(Admitted(task, group, staleness))

    def _discard(self, key: str, generation: bytes) -> None:
        """Deletes a rejected rollout (only if unchanged) so that its task is generated again."""
        self._fence()
        self.kv.cas(key, None, generation)

    # ------------------------------------------------------------------ acknowledging

    def retain(self, task_ids: set[str]) -> None:
        """Consumed tasks whose records acks must keep (until a later state no longer retains them)."""
        self._retained = set(task_ids) & self._consumed

    def ack(self, committed_state: dict) -> int:
        """Deletes the records of tasks consumed in ``committed_state`` (a state_dict() saved in a
        checkpoint that is now committed), except those it retains. Returns how many tasks were
        acknowledged."""
        kept = set(committed_state.get("retained", []))
        consumed = [str(t) for t in committed_state.get("consumed", []) if str(t) not in kept]
        if consumed:
            self._delete_records(consumed)
            self._consumed.difference_update(consumed)
            self.counters["acked"] += len(consumed)
        self.collect_garbage()
        return len(consumed)

    def collect_garbage(self) -> int:
        """Deletes records of ids below next_task_id that are neither outstanding nor consumed
        (orphans of late writes or of an interrupted ack)."""
        mine = self._issued.keys() | self._consumed
        n = 0
        for prefix in (keys.TASKS, keys.LEASES, keys.ROLLOUTS):
            dead = [t for t in keys.ids_under(self.kv.list(prefix), prefix)
                    if t not in mine and keys.task_number(t) < self._next]
            if dead:
                self._delete_records(dead, only=(prefix,))
                n += len(dead)
        self.counters["garbage_deleted"] += n
        return n

    def _delete_records(self, tids: Sequence[str],
                        only: Sequence[str] = (keys.TASKS, keys.LEASES, keys.ROLLOUTS)) -> None:
        # The task goes first, so no worker starts it again while its lease/rollout are removed.
        self._fence()
        for prefix in only:
            list(self._pool.map(self.kv.delete, [prefix + t for t in tids]))

    def close(self) -> None:
        self._pool.shutdown(wait=True)

